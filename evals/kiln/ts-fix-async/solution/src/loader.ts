export async function load(name: string): Promise<string> {
  await new Promise((r) => setTimeout(r, 5));
  return name.toUpperCase();
}

export async function loadAll(names: string[]): Promise<string[]> {
  return Promise.all(names.map((n) => load(n)));
}
