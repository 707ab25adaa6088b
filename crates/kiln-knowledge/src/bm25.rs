//! BM25 over chunks with tantivy. The `code` tokenizer splits identifiers: `parseHttpRequest`
//! and `parse_http_request` both yield `parse`, `http`, `request` (and the whole identifier).

use std::path::Path;

use tantivy::collector::TopDocs;
use tantivy::directory::{Directory, MmapDirectory};
use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STRING,
};
use tantivy::tokenizer::{TextAnalyzer, Token, TokenStream, Tokenizer};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, Term};

use crate::Error;

/// Splits text into lowercase identifier parts: runs of letters/digits/underscores, then
/// snake_case, camelCase and letter/digit boundaries.
pub fn code_terms(text: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !(bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
            continue;
        }
        let s = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let word = &text[s..i];
        let parts = split_identifier(word);
        let whole = word.trim_matches('_').to_ascii_lowercase();
        if parts.len() > 1 && !whole.is_empty() {
            out.push((s, i, whole));
        }
        for (ps, pe) in parts {
            out.push((s + ps, s + pe, word[ps..pe].to_ascii_lowercase()));
        }
    }
    out
}

/// The words of identifiers in `s`, lowercase, without the whole identifiers.
pub fn identifier_words(s: &str) -> Vec<String> {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .flat_map(|w| {
            split_identifier(w)
                .into_iter()
                .map(move |(a, b)| w[a..b].to_ascii_lowercase())
        })
        .collect()
}

fn split_identifier(w: &str) -> Vec<(usize, usize)> {
    let b = w.as_bytes();
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    for i in 0..b.len() {
        let c = b[i];
        if c == b'_' {
            if let Some(s) = start.take() {
                out.push((s, i));
            }
            continue;
        }
        if let Some(s) = start {
            let p = b[i - 1];
            let boundary = (p.is_ascii_lowercase() && c.is_ascii_uppercase())
                || (p.is_ascii_alphabetic() && c.is_ascii_digit())
                || (p.is_ascii_digit() && c.is_ascii_alphabetic())
                // `HTTPRequest`: the boundary is before the last capital of a run.
                || (p.is_ascii_uppercase() && c.is_ascii_uppercase() && b.get(i + 1).is_some_and(|n| n.is_ascii_lowercase()));
            if boundary {
                out.push((s, i));
                start = Some(i);
            }
        } else {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push((s, b.len()));
    }
    out
}

#[derive(Clone)]
struct CodeTokenizer;

struct VecStream {
    tokens: Vec<Token>,
    at: usize,
}

impl TokenStream for VecStream {
    fn advance(&mut self) -> bool {
        self.at += 1;
        self.at <= self.tokens.len()
    }
    fn token(&self) -> &Token {
        &self.tokens[self.at - 1]
    }
    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.at - 1]
    }
}

impl Tokenizer for CodeTokenizer {
    type TokenStream<'a> = VecStream;
    fn token_stream<'a>(&'a mut self, text: &'a str) -> VecStream {
        let tokens = code_terms(text)
            .into_iter()
            .filter(|t| t.2.len() <= 64)
            .enumerate()
            .map(|(n, (s, e, t))| Token {
                offset_from: s,
                offset_to: e,
                position: n,
                text: t,
                position_length: 1,
            })
            .collect();
        VecStream { tokens, at: 0 }
    }
}

/// The BM25 index of one knowledge index.
pub struct Bm25 {
    index: Index,
    writer: IndexWriter,
    reader: IndexReader,
    rowid: Field,
    text: Field,
    symbol: Field,
}

impl Bm25 {
    pub fn open(dir: &Path) -> Result<Bm25, Error> {
        std::fs::create_dir_all(dir)?;
        let mdir = MmapDirectory::open(dir).map_err(|e| Error::Search(e.to_string()))?;
        Self::open_in(Box::new(mdir))
    }

    /// The index in any tantivy directory (an encrypted index's is a `seal::SealedDirectory`).
    pub fn open_in(directory: Box<dyn Directory>) -> Result<Bm25, Error> {
        let mut sb = Schema::builder();
        let rowid = sb.add_i64_field("rowid", INDEXED | FAST);
        let _path = sb.add_text_field("path", STRING);
        let opts = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("code")
                .set_index_option(IndexRecordOption::WithFreqs),
        );
        let text = sb.add_text_field("text", opts.clone());
        let symbol = sb.add_text_field("symbol", opts);
        let schema = sb.build();
        let index = Index::open_or_create(directory, schema)?;
        index
            .tokenizers()
            .register("code", TextAnalyzer::from(CodeTokenizer));
        let writer = index.writer_with_num_threads(1, 32_000_000)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Bm25 {
            index,
            writer,
            reader,
            rowid,
            text,
            symbol,
        })
    }

    pub fn add(&mut self, rowid: i64, text: &str, symbol: Option<&str>) -> Result<(), Error> {
        self.writer.add_document(doc!(
            self.rowid => rowid,
            self.text => text,
            self.symbol => symbol.unwrap_or(""),
        ))?;
        Ok(())
    }

    pub fn delete(&mut self, rowid: i64) {
        self.writer
            .delete_term(Term::from_field_i64(self.rowid, rowid));
    }

    /// Makes what was added and deleted searchable.
    pub fn commit(&mut self) -> Result<(), Error> {
        self.writer.commit()?;
        self.reader.reload()?;
        Ok(())
    }

    /// The best `n` rows for `query` with their BM25 scores.
    pub fn search(&self, query: &str, n: usize) -> Result<Vec<(i64, f32)>, Error> {
        let mut terms: Vec<String> = code_terms(query).into_iter().map(|t| t.2).collect();
        terms.sort();
        terms.dedup();
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for t in &terms {
            clauses.push((
                Occur::Should,
                Box::new(TermQuery::new(
                    Term::from_field_text(self.text, t),
                    IndexRecordOption::WithFreqs,
                )),
            ));
            clauses.push((
                Occur::Should,
                Box::new(BoostQuery::new(
                    Box::new(TermQuery::new(
                        Term::from_field_text(self.symbol, t),
                        IndexRecordOption::WithFreqs,
                    )),
                    2.0,
                )),
            ));
        }
        let q = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let top = searcher.search(&q, &TopDocs::with_limit(n.max(1)))?;
        let mut out = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let seg = searcher.segment_reader(addr.segment_ord);
            let ff = seg.fast_fields().i64("rowid")?;
            if let Some(id) = ff.first(addr.doc_id) {
                out.push((id, score));
            }
        }
        Ok(out)
    }

    pub fn num_docs(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// The index's directory is removed by the caller after this is dropped.
    pub fn index(&self) -> &Index {
        &self.index
    }
}
