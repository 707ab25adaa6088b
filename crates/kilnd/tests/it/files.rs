//! File operations: streaming a 200 MB file both ways, atomic writes, and the error table.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use expect_test::expect;
use kiln_protocol::kilnd::{FileKind, FileStat, Reply, Request};
use kilnd::frame;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::UnixStream;

use crate::harness::{redact, within, Daemon};

/// `len` pseudo-random bytes, generated on the fly and hashed as they are read; fails with an
/// error after `fail_after` bytes if set.
struct Generator {
    left: u64,
    state: u64,
    hash: Sha256,
    fail_after: Option<u64>,
    produced: u64,
}

impl Generator {
    fn new(len: u64) -> Self {
        Generator {
            left: len,
            state: 0x9E37_79B9_7F4A_7C15,
            hash: Sha256::new(),
            fail_after: None,
            produced: 0,
        }
    }
}

impl AsyncRead for Generator {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.fail_after.is_some_and(|f| self.produced >= f) {
            return Poll::Ready(Err(io::Error::other("generator broke on purpose")));
        }
        let n = (buf.remaining() as u64).min(self.left).min(48 * 1024) as usize;
        let mut chunk = vec![0u8; n];
        for b in chunk.chunks_mut(8) {
            // xorshift64
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            let bytes = x.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        self.hash.update(&chunk);
        self.left -= n as u64;
        self.produced += n as u64;
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

/// The daemon cleans up asynchronously after a client vanished.
async fn wait_no_temp(dir: &Path) {
    within(async {
        while !temp_files(dir).is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("kiln-tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn stream_200mb_both_ways() {
    let d = Daemon::start().await;
    let dir = d.scratch();
    let path = dir.join("big.bin").display().to_string();
    const LEN: u64 = 200 * 1024 * 1024;
    let mut gen = Generator::new(LEN);
    let stat = within(d.client.write_file(&path, Some(0o640), false, &mut gen))
        .await
        .expect("write");
    let written = hex::encode(gen.hash.finalize());
    assert_eq!(stat.size, LEN);
    assert_eq!(stat.mode, 0o640);
    assert_eq!(stat.kind, FileKind::File);
    assert!(temp_files(&dir).is_empty());

    let (stat, mut data) = d.client.read_file(&path).await.expect("read");
    assert_eq!(stat.size, LEN);
    let mut hash = Sha256::new();
    let mut total = 0u64;
    within(async {
        while let Some(chunk) = data.next_chunk().await {
            let chunk = chunk.expect("chunk");
            assert!(chunk.len() <= 64 * 1024);
            total += chunk.len() as u64;
            hash.update(&chunk);
        }
    })
    .await;
    assert_eq!(total, LEN);
    assert_eq!(hex::encode(hash.finalize()), written);
}

#[tokio::test]
async fn failed_writes_leave_nothing_behind() {
    let d = Daemon::start().await;
    let dir = d.scratch();
    let path = dir.join("f.txt").display().to_string();
    d.client
        .write_file(&path, None, false, &b"original"[..])
        .await
        .expect("write");

    // The source fails midway: the client drops the connection before `End`.
    let mut gen = Generator::new(10 << 20);
    gen.fail_after = Some(1 << 20);
    let e = d
        .client
        .write_file(&path, None, false, &mut gen)
        .await
        .expect_err("must fail");
    assert!(e.to_string().contains("broke on purpose"), "{e}");

    // (The daemon had consumed part of the 1 MiB, so its temp file existed; it goes away.)
    wait_no_temp(&dir).await;

    // A raw client that sends some data and disappears once the temp file exists.
    let mut conn = UnixStream::connect(d.client.socket_path())
        .await
        .expect("connect");
    let req = Request::WriteFile {
        path: path.clone(),
        mode: None,
        parents: false,
    };
    frame::write_json(&mut conn, &req).await.expect("request");
    frame::write_data(&mut conn, &[1u8; 100_000])
        .await
        .expect("data");
    within(async {
        while temp_files(&dir).is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(conn);
    wait_no_temp(&dir).await;
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "original");
    // A JSON frame instead of data is a protocol error, also without leftovers.
    let mut conn = UnixStream::connect(d.client.socket_path())
        .await
        .expect("connect");
    frame::write_json(&mut conn, &req).await.expect("request");
    frame::write_json(&mut conn, &Request::Ping)
        .await
        .expect("bogus");
    let reply = frame::read_frame(&mut conn)
        .await
        .expect("reply")
        .expect("frame")
        .parse::<Reply>()
        .expect("json");
    assert!(matches!(reply, Reply::Error(_)), "{reply:?}");
    assert!(temp_files(&dir).is_empty());
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "original");
}

fn show(r: Result<FileStat, kilnd::ClientError>) -> String {
    match r {
        Ok(s) => {
            let target = s
                .symlink_target
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
            // Directory sizes depend on the filesystem.
            let size = if s.kind == FileKind::Dir {
                String::new()
            } else {
                format!(" size={}", s.size)
            };
            format!(
                "{:?} {} name={}{size} mode={:o}{target}",
                s.kind, s.path, s.name, s.mode
            )
        }
        Err(kilnd::ClientError::Daemon(e)) => format!("error {:?}: {}", e.code, e.message),
        Err(e) => format!("client error: {e}"),
    }
}

#[tokio::test]
async fn file_operations_table() {
    let d = Daemon::start().await;
    let dir = d.scratch();
    let t = dir.display().to_string();
    let c = &d.client;
    let p = |rel: &str| format!("{t}/{rel}");
    std::os::unix::fs::symlink("a/f.txt", dir.join("link")).expect("symlink");
    let mut out = Vec::<String>::new();
    macro_rules! step {
        ($name:expr, $e:expr) => {
            out.push(format!("{}: {}", $name, show($e)))
        };
    }
    step!(
        "write keep.txt",
        c.write_file(&p("keep.txt"), None, false, &b"keep"[..])
            .await
    );
    step!("stat missing", c.stat(&p("missing")).await);
    step!("mkdir a", c.mkdir(&p("a"), false).await);
    step!("mkdir a again", c.mkdir(&p("a"), false).await);
    step!("mkdir -p a again", c.mkdir(&p("a"), true).await);
    step!("mkdir x/y/z", c.mkdir(&p("x/y/z"), false).await);
    step!("mkdir -p x/y/z", c.mkdir(&p("x/y/z"), true).await);
    step!(
        "write a/f.txt",
        c.write_file(&p("a/f.txt"), Some(0o600), false, &b"hello"[..])
            .await
    );
    step!(
        "rewrite keeps mode",
        c.write_file(&p("a/f.txt"), None, false, &b"hello!"[..])
            .await
    );
    step!(
        "write through symlink",
        c.write_file(&p("link"), None, false, &b"linked"[..]).await
    );
    step!("stat symlink", c.stat(&p("link")).await);
    step!(
        "write nope/f.txt",
        c.write_file(&p("nope/f.txt"), None, false, &b""[..]).await
    );
    step!(
        "write onto a dir",
        c.write_file(&p("a"), None, false, &b""[..]).await
    );
    step!(
        "write below a file",
        c.write_file(&p("a/f.txt/g"), None, false, &b""[..]).await
    );
    step!(
        "write -p p/q/r.txt",
        c.write_file(&p("p/q/r.txt"), None, true, &b"r"[..]).await
    );
    step!(
        "move onto existing",
        c.move_path(&p("a/f.txt"), &p("p/q/r.txt"), false).await
    );
    step!(
        "move overwrite",
        c.move_path(&p("a/f.txt"), &p("p/q/r.txt"), true).await
    );
    step!(
        "move missing",
        c.move_path(&p("a/f.txt"), &p("a/g.txt"), false).await
    );
    step!(
        "move into itself",
        c.move_path(&p("p"), &p("p/q/inside"), false).await
    );
    step!("move dir", c.move_path(&p("x"), &p("a/x"), false).await);
    step!(
        "relative path",
        c.stat(p("a/x/y/../y/z").trim_start_matches('/')).await
    );
    step!("stat escape", c.stat("../../etc").await);
    step!(
        "write escape",
        c.write_file("/a/../../b", None, false, &b""[..]).await
    );
    step!("mkdir escape", c.mkdir("/..", true).await);
    for (name, r) in [
        ("remove non-empty dir", c.remove(&p("p"), false).await),
        ("remove missing", c.remove(&p("missing"), false).await),
        ("remove root", c.remove("/", true).await),
        ("remove -r p", c.remove(&p("p"), true).await),
        ("remove link", c.remove(&p("link"), false).await),
    ] {
        out.push(format!(
            "{name}: {}",
            r.map_or_else(
                |e| format!(
                    "error {:?}: {}",
                    e.code()
                        .unwrap_or(kiln_protocol::kilnd::DaemonErrorCode::Internal),
                    e
                ),
                |()| "ok".into()
            )
        ));
    }
    match c.list_dir(&t, 1).await {
        Ok(entries) => out.push(format!(
            "list depth 1: {:?}",
            entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>()
        )),
        Err(e) => out.push(format!("list depth 1: error {e}")),
    }
    match c.list_dir(&t, 5).await {
        Ok(entries) => out.push(format!(
            "list depth 5: {:?}",
            entries
                .iter()
                .map(|e| format!("{:?} {}", e.kind, e.path))
                .collect::<Vec<_>>()
        )),
        Err(e) => out.push(format!("list depth 5: error {e}")),
    }
    for (name, r) in [
        (
            "list a file",
            c.list_dir(&p("keep.txt"), 1).await.map(|_| ()),
        ),
        (
            "list missing",
            c.list_dir(&p("missing"), 1).await.map(|_| ()),
        ),
        ("read a dir", c.read_file(&p("a")).await.map(|_| ())),
        ("read missing", c.read_file(&p("missing")).await.map(|_| ())),
    ] {
        out.push(format!(
            "{name}: {}",
            r.map_or_else(|e| e.to_string(), |()| "ok".into())
        ));
    }
    let text = redact(&out.join("\n"), &dir);
    expect![[r#"
        write keep.txt: File $T/keep.txt name=keep.txt size=4 mode=644
        stat missing: error NotFound: $T/missing: No such file or directory
        mkdir a: Dir $T/a name=a mode=755
        mkdir a again: error AlreadyExists: $T/a: File exists
        mkdir -p a again: Dir $T/a name=a mode=755
        mkdir x/y/z: error NotFound: $T/x/y/z: No such file or directory
        mkdir -p x/y/z: Dir $T/x/y/z name=z mode=755
        write a/f.txt: File $T/a/f.txt name=f.txt size=5 mode=600
        rewrite keeps mode: File $T/a/f.txt name=f.txt size=6 mode=600
        write through symlink: File $T/link name=link size=6 mode=600
        stat symlink: Symlink $T/link name=link size=7 mode=777 -> a/f.txt
        write nope/f.txt: error NotFound: $T/nope: No such file or directory
        write onto a dir: error WrongKind: $T/a: Is a directory
        write below a file: error WrongKind: $T/a/f.txt: Not a directory
        write -p p/q/r.txt: File $T/p/q/r.txt name=r.txt size=1 mode=644
        move onto existing: error AlreadyExists: $T/p/q/r.txt: already exists
        move overwrite: File $T/p/q/r.txt name=r.txt size=6 mode=600
        move missing: error NotFound: $T/a/f.txt: No such file or directory
        move into itself: error Invalid: cannot move $T/p into itself
        move dir: Dir $T/a/x name=x mode=755
        relative path: Dir $T/a/x/y/z name=z mode=755
        stat escape: error Invalid: path escapes the sandbox root: ../../etc
        write escape: error Invalid: path escapes the sandbox root: /a/../../b
        mkdir escape: error Invalid: path escapes the sandbox root: /..
        remove non-empty dir: error WrongKind: kilnd: $T/p: Directory not empty (use recursive)
        remove missing: error NotFound: kilnd: $T/missing: No such file or directory
        remove root: error Invalid: kilnd: refusing to remove the root directory
        remove -r p: ok
        remove link: ok
        list depth 1: ["a", "keep.txt"]
        list depth 5: ["Dir $T/a", "Dir $T/a/x", "Dir $T/a/x/y", "Dir $T/a/x/y/z", "File $T/keep.txt"]
        list a file: kilnd: $T/keep.txt: Not a directory
        list missing: kilnd: $T/missing: No such file or directory
        read a dir: kilnd: $T/a: Is a directory
        read missing: kilnd: $T/missing: No such file or directory"#]].assert_eq(&text);
}
