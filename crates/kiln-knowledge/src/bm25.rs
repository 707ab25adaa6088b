//! BM25 over chunks with tantivy. The `code` tokenizer splits identifiers: `parseHttpRequest`
//! and `parse_http_request` both yield `parse`, `http`, `request` (and the whole identifier),
//! and stems the parts (English Snowball: `elements` and `element` meet). Queries drop English
//! function words (`the`, `of`, `given`), which are rare in code and so would weigh most.

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

/// Version of the indexed terms; an index written with another is rebuilt from the store.
pub const FORMAT: &str = "code2-stem";

thread_local! {
    static STEMMER: rust_stemmers::Stemmer = rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English);
}

/// The stem of one lowercase identifier part.
pub fn stem(w: &str) -> String {
    if w.len() <= 3 || w.bytes().any(|b| !b.is_ascii_lowercase()) {
        return w.to_string();
    }
    STEMMER.with(|s| s.stem(w).into_owned())
}

/// English function words and prompt boilerplate dropped from queries.
const STOP: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "been", "but", "by", "can", "do", "does", "for",
    "from", "given", "has", "have", "if", "in", "into", "is", "it", "its", "of", "on", "or",
    "should", "so", "such", "that", "the", "their", "them", "then", "there", "these", "this",
    "those", "to", "was", "we", "were", "which", "will", "with", "you", "your",
];

/// The terms of a query: stemmed identifier parts and words without stop words.
pub fn query_terms(query: &str) -> Vec<String> {
    let mut terms: Vec<String> = code_terms(query)
        .into_iter()
        .map(|t| t.2)
        .filter(|t| !STOP.contains(&t.as_str()))
        .collect();
    terms.sort();
    terms.dedup();
    terms
}

/// Splits text into lowercase identifier parts: runs of letters/digits/underscores, then
/// snake_case, camelCase and letter/digit boundaries; parts are stemmed, a whole identifier
/// made of several parts is kept too.
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
            out.push((s + ps, s + pe, stem(&word[ps..pe].to_ascii_lowercase())));
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
    stale: bool,
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
        // The term format lives in the directory itself (sealed with it when encrypted).
        let format_file = Path::new("FORMAT");
        let format = directory
            .atomic_read(format_file)
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        let index = Index::open_or_create(directory, schema)?;
        index
            .tokenizers()
            .register("code", TextAnalyzer::from(CodeTokenizer));
        let writer = index.writer_with_num_threads(1, 32_000_000)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let mut bm = Bm25 {
            index,
            writer,
            reader,
            rowid,
            text,
            symbol,
            stale: false,
        };
        if format.trim() != FORMAT {
            if bm.num_docs() > 0 {
                // Written with other terms: the caller re-adds every chunk.
                bm.writer.delete_all_documents()?;
                bm.commit()?;
                bm.stale = true;
            }
            bm.index
                .directory()
                .atomic_write(format_file, FORMAT.as_bytes())?;
        }
        Ok(bm)
    }

    /// True when the index was emptied at open because its terms had another format: the
    /// caller adds every chunk again.
    pub fn needs_refill(&self) -> bool {
        self.stale
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
        let terms = query_terms(query);
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
