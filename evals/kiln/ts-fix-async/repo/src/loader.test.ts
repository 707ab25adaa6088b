import { test } from "node:test";
import assert from "node:assert/strict";
import { loadAll } from "./loader";

test("loads all in order", async () => {
  assert.deepEqual(await loadAll(["a", "b", "c"]), ["A", "B", "C"]);
});
