//! Chunk boundaries per language, as snapshots.

use expect_test::{expect, Expect};
use kiln_knowledge::chunk::{chunk_file, ChunkLimits};
use kiln_knowledge::Language;

fn render(path: &str, lang: Language, text: &str, limits: &ChunkLimits) -> String {
    let mut out = String::new();
    for c in chunk_file(path, lang, text, limits) {
        let first = c.text.lines().next().unwrap_or("");
        out.push_str(&format!(
            "{}-{} {} {} | {}\n",
            c.start_line,
            c.end_line,
            c.kind.as_str(),
            c.symbol.as_deref().unwrap_or("-"),
            first.trim()
        ));
        assert_eq!(c.id, kiln_knowledge::chunk::chunk_id(&c.text));
    }
    out
}

fn check(path: &str, lang: Language, text: &str, limits: &ChunkLimits, expect: Expect) {
    expect.assert_eq(&render(path, lang, text, limits));
}

/// Small limits so that splitting and merging show on small inputs.
fn small() -> ChunkLimits {
    ChunkLimits {
        max_chars: 400,
        max_lines: 12,
        min_chars: 60,
        window: 6,
        overlap: 2,
    }
}

const PY: &str = r#"import os
import sys

CONSTANT = 3

def tiny():
    return 1

def also_tiny():
    return 2

class Store:
    """A store of things."""

    def __init__(self, path):
        self.path = path
        self.items = []

    def add(self, item):
        self.items.append(item)
        if len(self.items) > 100:
            self.flush()
        return len(self.items)

    @property
    def size(self):
        return len(self.items)

def long_function(a, b):
    x = a + b
    y = a - b
    z = a * b
    w = a / b
    v = a ** b
    u = a % b
    t = a // b
    s = x + y + z
    r = w + v + u
    q = t + s + r
    p = q * 2
    o = p * 3
    return o
"#;

#[test]
fn python_chunks() {
    check(
        "store.py",
        Language::Python,
        PY,
        &small(),
        expect![[r#"
            1-10 function tiny, also_tiny | import os
            12-13 class Store | class Store:
            15-17 method Store.__init__ | class Store:
            19-23 method Store.add | class Store:
            25-27 method Store.size | class Store:
            29-40 function long_function | def long_function(a, b):
            41-42 function long_function | def long_function(a, b):
        "#]],
    );
}

const RS: &str = r#"use std::fmt;

/// A point.
pub struct Point {
    x: i32,
    y: i32,
}

impl Point {
    pub fn new(x: i32, y: i32) -> Self {
        Point { x, y }
    }

    pub fn norm(&self) -> f64 {
        let x = self.x as f64;
        let y = self.y as f64;
        (x * x + y * y).sqrt()
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "({}, {})", self.x, self.y)
    }
}

mod tests {
    fn helper() -> u32 {
        7
    }
}

fn main() {
    println!("{}", Point::new(1, 2));
}
"#;

#[test]
fn rust_chunks() {
    check(
        "point.rs",
        Language::Rust,
        RS,
        &small(),
        expect![[r#"
            1-7 type Point | use std::fmt;
            9-19 impl Point | impl Point {
            21-31 impl fmt::Display for Point, tests | impl fmt::Display for Point {
            33-35 function main | fn main() {
        "#]],
    );
}

const TS: &str = r#"import { readFile } from "fs";

export interface Options {
  verbose: boolean;
}

export class Parser {
  private opts: Options;

  constructor(opts: Options) {
    this.opts = opts;
  }

  parse(text: string): string[] {
    const out: string[] = [];
    for (const line of text.split("\n")) {
      if (line.trim().length > 0) {
        out.push(line.trim());
      }
    }
    return out;
  }
}

export const load = async (path: string) => {
  const text = await readFile(path, "utf8");
  return new Parser({ verbose: false }).parse(text);
};

function helper(a: number): number {
  return a * 2;
}
"#;

#[test]
fn typescript_chunks() {
    check(
        "parser.ts",
        Language::TypeScript,
        TS,
        &small(),
        expect![[r#"
            1-7 trait Options, Parser | import { readFile } from "fs";
            8-12 method Parser.constructor | export class Parser {
            14-23 method Parser.parse | export class Parser {
            25-32 function load, helper | export const load = async (path: string) => {
        "#]],
    );
}

const JS: &str = r#"const express = require("express");

function handler(req, res) {
  res.send("ok");
}

class Router {
  route(path) {
    return path;
  }
}

module.exports = { handler, Router };
"#;

#[test]
fn javascript_chunks() {
    check(
        "app.js",
        Language::JavaScript,
        JS,
        &ChunkLimits::default(),
        expect![[r#"
            1-13 function handler, Router | const express = require("express");
        "#]],
    );
}

const MD: &str = r#"Intro line before any heading.

# Title

Some text about the project.

## Install

```sh
# not a heading
make run
```

## Use

Run it.
More lines.
And more.
Even more.
Still more.
Last one.
"#;

#[test]
fn markdown_chunks() {
    check(
        "README.md",
        Language::Markdown,
        MD,
        &small(),
        expect![[r#"
            1-6 section Title | Intro line before any heading.
            7-13 section Install | ## Install
            14-21 section Use | ## Use
        "#]],
    );
}

#[test]
fn text_windows_overlap() {
    let text: String = (1..=14).map(|i| format!("line {i}\n")).collect();
    check(
        "notes.txt",
        Language::Text,
        &text,
        &small(),
        expect![[r#"
            1-6 lines - | line 1
            5-10 lines - | line 5
            9-14 lines - | line 9
        "#]],
    );
}

#[test]
fn empty_and_blank_files_have_no_chunks() {
    assert!(chunk_file("a.py", Language::Python, "", &ChunkLimits::default()).is_empty());
    assert!(chunk_file("a.txt", Language::Text, "\n\n  \n", &ChunkLimits::default()).is_empty());
}

#[test]
fn broken_syntax_still_chunks() {
    let chunks = chunk_file(
        "bad.py",
        Language::Python,
        "def f(:\n  return )\n",
        &ChunkLimits::default(),
    );
    assert!(!chunks.is_empty());
}
