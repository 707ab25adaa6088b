export function parseQuery(q: string): Record<string, string> {
  return {};
}
