import { test } from "node:test";
import assert from "node:assert/strict";
import { area } from "./shapes";

test("areas", () => {
  assert.equal(area({ kind: "square", side: 3 }), 9);
  assert.equal(area({ kind: "rect", width: 2, height: 5 }), 10);
  assert.equal(Math.round(area({ kind: "circle", radius: 1 }) * 100), 314);
});
