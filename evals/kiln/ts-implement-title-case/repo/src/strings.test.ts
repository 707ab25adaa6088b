import { test } from "node:test";
import assert from "node:assert/strict";
import { titleCase } from "./strings";

test("title case", () => {
  assert.equal(titleCase("hello wORLD"), "Hello World");
  assert.equal(titleCase("  two  spaces "), "  Two  Spaces ");
  assert.equal(titleCase(""), "");
});
