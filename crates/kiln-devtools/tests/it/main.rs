//! Integration tests of kiln-devtools: real git driven through a real kilnd (serving a temp
//! socket on the host, as in kilnd's own tests), against a real git smart-HTTP server on
//! loopback (`git http-backend` behind a small Basic-auth CGI bridge, `kiln_devtools::gitserver`), and the
//! real language servers of the templates in real sandboxes (`sandbox`, `lsp`).

mod git;
mod lsp;
mod sandbox;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kilnd::{Client, ClientError};

/// The kilnd binary: `$KILN_KILND` (set by `make test`), else the workspace's target dir.
pub fn kilnd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_KILND") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    for p in [
        target.join("x86_64-unknown-linux-gnu/kilnd/kilnd"),
        target.join("release/kilnd"),
        target.join("debug/kilnd"),
    ] {
        if p.is_file() {
            return p;
        }
    }
    panic!("kilnd not found: run `make kilnd` or set KILN_KILND");
}

/// `kilnd serve` on a temp socket; SIGTERM on drop.
pub struct Daemon {
    child: Child,
    pub dir: tempfile::TempDir,
    pub client: Client,
}

impl Daemon {
    pub async fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("run/kilnd.sock");
        let child = Command::new(kilnd_bin())
            .args(["serve", "--listen"])
            .arg(&sock)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn kilnd");
        let client = Client::new(&sock);
        for _ in 0..2000 {
            match client.ping().await {
                Ok(_) => break,
                Err(ClientError::Connect(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => panic!("ping: {e}"),
            }
        }
        Daemon { child, dir, client }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
