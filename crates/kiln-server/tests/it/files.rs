//! Files through the API: a 200 MB streamed upload and download with a checksum, metadata
//! operations, errors, and the change watch.

use futures_util::StreamExt;
use kiln_protocol::api::{CreateSandbox, FileList, FileStat, SizeArg, WatchEvent};
use sha2::{Digest, Sha256};

use crate::harness;

const SIZE: u64 = 200 * 1024 * 1024;

/// Deterministic pseudo-random bytes, generated on the fly (never held in memory whole).
fn chunks() -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::iter(0..(SIZE / (1 << 20))).map(|i| {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Ok(v)
    })
}

#[tokio::test]
async fn large_file_round_trip_and_file_ops() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s
        .create(&CreateSandbox {
            disk: Some(SizeArg::Text("1G".into())),
            ..Default::default()
        })
        .await;
    let id = sb.id.as_str();

    // The same deterministic stream twice: once hashed here, once uploaded.
    let mut expected = Sha256::new();
    let mut local = Box::pin(chunks());
    while let Some(Ok(b)) = local.next().await {
        expected.update(&b);
    }
    let r = s
        .http
        .put(s.url(&format!(
            "/v1/sandboxes/{id}/files?path=/workspace/big.bin&mode=0640"
        )))
        .body(reqwest::Body::wrap_stream(chunks()))
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 201);
    let st: FileStat = r.json().await.expect("json");
    assert_eq!((st.size, st.mode & 0o777), (SIZE, 0o640));
    let expected = hex::encode(expected.finalize());

    // The sandbox sees the same bytes.
    let (out, _, _) = s
        .sh(id, "sha256sum /workspace/big.bin | cut -d' ' -f1")
        .await;
    assert_eq!(out.trim(), expected);
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files?path=/workspace/big.bin")))
        .send()
        .await
        .expect("download");
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(SIZE));
    let mut got = Sha256::new();
    let mut n = 0u64;
    let mut body = r.bytes_stream();
    while let Some(c) = body.next().await {
        let c = c.expect("chunk");
        n += c.len() as u64;
        got.update(&c);
    }
    assert_eq!(n, SIZE);
    assert_eq!(hex::encode(got.finalize()), expected);

    // mkdir -p, list, move, stat, remove.
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/files/mkdir")))
        .json(&serde_json::json!({"path": "/workspace/a/b/c"}))
        .send()
        .await
        .expect("mkdir");
    assert_eq!(r.status(), 201);
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/files/move")))
        .json(&serde_json::json!({"from": "/workspace/big.bin", "to": "/workspace/a/b/c/big.bin"}))
        .send()
        .await
        .expect("move");
    assert_eq!(r.status(), 200);
    let list: FileList = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{id}/files/list?path=/workspace&depth=4"
        )))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let names: Vec<String> = list.entries.iter().map(|e| e.path.clone()).collect();
    assert!(
        names.contains(&"/workspace/a/b/c/big.bin".to_string()),
        "{names:?}"
    );
    let r = s
        .http
        .delete(s.url(&format!("/v1/sandboxes/{id}/files?path=/workspace/a")))
        .send()
        .await
        .expect("rm");
    assert_eq!(r.status(), 400, "a non-empty dir needs recursive=true");
    let r = s
        .http
        .delete(s.url(&format!(
            "/v1/sandboxes/{id}/files?path=/workspace/a&recursive=true"
        )))
        .send()
        .await
        .expect("rm");
    assert_eq!(r.status(), 204);
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files/stat?path=/workspace/a")))
        .send()
        .await
        .expect("stat");
    assert_eq!(r.status(), 404);

    // Paths cannot climb out of the sandbox root; a directory cannot be downloaded.
    let r = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{id}/files?path=../../../etc/shadow"
        )))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files?path=/etc")))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files")))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400, "missing path");
    s.teardown().await;
}

#[tokio::test]
async fn watch_streams_changes() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s.create(&CreateSandbox::default()).await;
    let id = sb.id.clone();
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files/watch?path=/workspace")))
        .send()
        .await
        .expect("watch");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    s.sh(&id, "mkdir -p /workspace/w && echo hi > /workspace/w/f.txt")
        .await;
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.contains("/workspace/w/f.txt") && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(std::time::Duration::from_secs(10), body.next()).await {
            Ok(Some(Ok(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            _ => break,
        }
    }
    let events: Vec<WatchEvent> = seen
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.iter().any(|e| e.path == "/workspace/w" && e.is_dir),
        "{seen}"
    );
    assert!(
        events.iter().any(|e| e.path == "/workspace/w/f.txt"),
        "{seen}"
    );
    drop(body);
    s.teardown().await;
}
