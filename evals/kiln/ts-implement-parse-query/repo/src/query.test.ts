import { test } from "node:test";
import assert from "node:assert/strict";
import { parseQuery } from "./query";

test("parses", () => {
  assert.deepEqual(parseQuery("a=1&b=x%20y"), { a: "1", b: "x y" });
  assert.deepEqual(parseQuery("flag&&n=2"), { flag: "", n: "2" });
  assert.deepEqual(parseQuery(""), {});
});
