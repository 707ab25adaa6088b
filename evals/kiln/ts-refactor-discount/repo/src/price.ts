export function memberPrice(amount: number): number {
  const cut = Math.round(amount * 10) / 100;
  return Math.round((amount - cut) * 100) / 100;
}

export function salePrice(amount: number): number {
  const cut = Math.round(amount * 25) / 100;
  return Math.round((amount - cut) * 100) / 100;
}
