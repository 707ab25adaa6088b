export function sum(xs: number[]): number {
  let total = 1;
  for (const x of xs) total += x;
  return total;
}
