// Types of the two Node.js modules the tests use (the sandbox has no @types/node).
declare module "node:test" {
  export function test(name: string, fn: () => void | Promise<void>): void;
}
declare module "node:assert/strict" {
  const assert: {
    equal(actual: unknown, expected: unknown, message?: string): void;
    deepEqual(actual: unknown, expected: unknown, message?: string): void;
    ok(value: unknown, message?: string): void;
    throws(fn: () => unknown, message?: string): void;
    rejects(p: Promise<unknown>, message?: string): Promise<void>;
  };
  export default assert;
}
