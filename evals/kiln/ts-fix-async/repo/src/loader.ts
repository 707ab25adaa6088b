export async function load(name: string): Promise<string> {
  await new Promise((r) => setTimeout(r, 5));
  return name.toUpperCase();
}

export async function loadAll(names: string[]): Promise<string[]> {
  const out: string[] = [];
  names.forEach(async (n) => {
    out.push(await load(n));
  });
  return out;
}
