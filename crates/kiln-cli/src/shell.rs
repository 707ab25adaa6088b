//! `kiln sandbox shell ID`: an interactive terminal in a sandbox over the PTY WebSocket, with
//! raw mode, window-size tracking (SIGWINCH) and detach/re-attach by session id.

use std::io::Write;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use kiln_protocol::api::PtyMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::api::Api;

#[derive(Args, Debug)]
pub struct ShellArgs {
    pub id: String,
    /// Re-attach to an existing PTY session instead of starting a new shell
    #[arg(long)]
    pub session: Option<String>,
    /// Command to run instead of the login shell
    #[arg(long)]
    pub cmd: Option<String>,
    /// User to run as
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    #[arg(long)]
    pub cwd: Option<String>,
}

/// Restores cooked mode when dropped, whatever path the shell leaves by.
struct RawGuard(bool);
impl Drop for RawGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
}

pub async fn run(api: &Api, a: ShellArgs) -> Result<i32> {
    let (cols, rows) = crossterm::terminal::size().unwrap_or((80, 24));
    let mut q = vec![format!("cols={cols}"), format!("rows={rows}")];
    if let Some(s) = &a.session {
        q.push(format!("session={}", urlencode(s)));
    }
    if let Some(c) = &a.cmd {
        q.push(format!("cmd={}", urlencode(c)));
    }
    if let Some(u) = &a.user {
        q.push(format!("user={}", urlencode(u)));
    }
    if let Some(c) = &a.cwd {
        q.push(format!("cwd={}", urlencode(c)));
    }
    // Surface API errors (404, 409 paused ...) as one line before upgrading.
    api.send(api.request(reqwest::Method::GET, &format!("/v1/sandboxes/{}", a.id)))
        .await?;
    let (url, token) = api.ws_url(&format!("/v1/sandboxes/{}/pty?{}", a.id, q.join("&")));
    let mut req = url
        .as_str()
        .into_client_request()
        .context("bad server URL")?;
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow!("the token contains invalid characters"))?,
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| anyhow!("cannot open the terminal: {e}"))?;
    let (mut tx, mut rx) = ws.split();
    let is_tty = crossterm::tty::IsTty::is_tty(&std::io::stdin());
    let _guard = RawGuard(is_tty && crossterm::terminal::enable_raw_mode().is_ok());

    let input = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 4096];
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        let mut eof = false;
        loop {
            tokio::select! {
                n = stdin.read(&mut buf), if !eof => {
                    let n = n.unwrap_or(0);
                    if n == 0 {
                        // End of piped input: send EOT (what Ctrl-D types) so the program sees
                        // end-of-file, and keep the socket open until it exits.
                        eof = true;
                        if tx.send(Message::Binary(vec![4])).await.is_err() { break; }
                        continue;
                    }
                    if tx.send(Message::Binary(buf[..n].to_vec())).await.is_err() { break; }
                }
                Some(_) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    if let Ok((cols, rows)) = crossterm::terminal::size() {
                        let m = serde_json::to_string(&PtyMessage::Resize { cols, rows }).unwrap_or_default();
                        if tx.send(Message::Text(m)).await.is_err() { break; }
                    }
                }
            }
        }
        let _ = tx.close().await;
    });

    let mut session = None;
    let mut code = 0;
    while let Some(msg) = rx.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                let mut o = std::io::stdout().lock();
                o.write_all(&b)?;
                o.flush()?;
            }
            Ok(Message::Text(t)) => match serde_json::from_str::<PtyMessage>(&t) {
                Ok(PtyMessage::Opened { session: s }) => session = Some(s),
                Ok(PtyMessage::Exit(st)) => {
                    code = crate::sandbox::exit_code(&st);
                    break;
                }
                _ => {}
            },
            Ok(Message::Close(_)) | Err(_) => break,
            _ => {}
        }
    }
    input.abort();
    drop(_guard);
    if code == 0 && session.is_none() {
        return Err(anyhow!("the terminal closed before a session was opened"));
    }
    Ok(code)
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
