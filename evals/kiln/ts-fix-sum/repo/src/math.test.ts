import { test } from "node:test";
import assert from "node:assert/strict";
import { sum } from "./math";

test("sums", () => {
  assert.equal(sum([1, 2, 3]), 6);
  assert.equal(sum([]), 0);
});
