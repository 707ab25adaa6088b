export function titleCase(s: string): string {
  return s;
}
