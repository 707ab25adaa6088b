//! A git smart-HTTP server for tests (this crate's and the server's): the real
//! `git http-backend` as CGI behind a tiny threaded HTTP/1.1 server that demands Basic auth
//! for every request (no keep-alive, bodies by Content-Length, which is what git sends for
//! small pushes). Not for production: it serves every repository under its root to one
//! user, on a thread per connection, until the process ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use std::process::{Command, Stdio};

use base64::Engine;

pub struct GitServer {
    pub url: String,
}

impl GitServer {
    /// Serves the bare repositories under `root` to `user:password` on a loopback port.
    pub fn start(root: &Path, user: &str, password: &str) -> std::io::Result<GitServer> {
        Self::start_on("127.0.0.1", root, user, password)
    }

    /// The same on `ip` (e.g. a bridge address sandboxes reach), on a free port.
    pub fn start_on(
        ip: &str,
        root: &Path,
        user: &str,
        password: &str,
    ) -> std::io::Result<GitServer> {
        let l = TcpListener::bind((ip, 0))?;
        let url = format!("http://{ip}:{}", l.local_addr()?.port());
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let r = root.to_path_buf();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (r, e) = (r.clone(), expected.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &r, &e);
                });
            }
        });
        Ok(GitServer { url })
    }
}

fn handle(mut conn: TcpStream, root: &Path, expected_auth: &str) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let (mut len, mut ctype, mut auth) = (0usize, String::new(), String::new());
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "content-type" => ctype = v.trim().to_string(),
                "authorization" => auth = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if auth != expected_auth {
        return conn.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut child = Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", &ctype)
        .env("CONTENT_LENGTH", len.to_string())
        .env("REMOTE_USER", "tester")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&body)?;
    }
    let out = child.wait_with_output()?;
    // CGI output: headers, blank line, body.
    let sep = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        });
    let Some((i, n)) = sep else {
        return conn.write_all(b"HTTP/1.1 500 Bad CGI\r\nContent-Length: 0\r\n\r\n");
    };
    let head = String::from_utf8_lossy(&out.stdout[..i]).into_owned();
    let payload = &out.stdout[i + n..];
    let mut status = "200 OK".to_string();
    let mut headers = String::new();
    for h in head.lines() {
        match h.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_string(),
            Some(_) => {
                headers.push_str(h.trim_end());
                headers.push_str("\r\n");
            }
            None => {}
        }
    }
    let resp = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    conn.write_all(resp.as_bytes())?;
    conn.write_all(payload)
}
