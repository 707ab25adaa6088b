export function applyDiscount(amount: number, percent: number): number {
  const cut = Math.round(amount * percent) / 100;
  return Math.round((amount - cut) * 100) / 100;
}

export function memberPrice(amount: number): number {
  return applyDiscount(amount, 10);
}

export function salePrice(amount: number): number {
  return applyDiscount(amount, 25);
}
