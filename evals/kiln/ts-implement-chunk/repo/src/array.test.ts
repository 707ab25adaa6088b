import { test } from "node:test";
import assert from "node:assert/strict";
import { chunk } from "./array";

test("chunks", () => {
  assert.deepEqual(chunk([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]]);
  assert.deepEqual(chunk(["a"], 3), [["a"]]);
  assert.deepEqual(chunk([], 2), []);
});

test("size must be positive", () => {
  assert.throws(() => chunk([1], 0));
});
