import { test } from "node:test";
import assert from "node:assert/strict";
import { memberPrice, salePrice } from "./price";

test("prices", () => {
  assert.equal(memberPrice(100), 90);
  assert.equal(salePrice(100), 75);
  assert.equal(memberPrice(19.99), 17.99);
});
