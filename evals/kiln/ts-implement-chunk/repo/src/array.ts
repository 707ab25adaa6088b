export function chunk<T>(xs: T[], size: number): T[][] {
  throw new Error("not implemented");
}
