//! `kiln-mcp-testserver`: Kiln's in-tree MCP test server (see `kiln_agent::mcp_testserver`)
//! over stdio, or over streamable HTTP with `--http ADDR` (prints `listening on
//! http://ADDR/mcp`). `--extra N` adds N more tools (for tool search).

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut http = None;
    let mut extra = 0usize;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--http" => {
                http = args.get(i + 1).cloned();
                i += 1;
            }
            "--extra" => {
                extra = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(0);
                i += 1;
            }
            other => return Err(format!("unknown argument `{other}`").into()),
        }
        i += 1;
    }
    match http {
        None => kiln_agent::mcp_testserver::serve_stdio(extra).await,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            println!("listening on http://{}/mcp", listener.local_addr()?);
            use std::io::Write as _;
            std::io::stdout().flush()?;
            kiln_agent::mcp_testserver::serve_http(
                listener,
                extra,
                tokio_util::sync::CancellationToken::new(),
            )
            .await?;
            Ok(())
        }
    }
}
