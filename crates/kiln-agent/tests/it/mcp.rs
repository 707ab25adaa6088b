//! The MCP client against real MCP servers: Kiln's in-tree `rmcp` test server over stdio (the
//! `kiln-mcp-testserver` binary, a child process) and over streamable HTTP, and the reference
//! filesystem server from npm (`@modelcontextprotocol/server-filesystem`, installed pinned by
//! scripts/install-mcp-servers.sh). Tools are namespaced by server, arguments are checked
//! against each tool's schema before anything is sent, errors come back as errors, a server
//! that died is reconnected, and tool search finds deferred tools.

use std::sync::Arc;

use kiln_agent::mcp::{McpConfig, McpHub, McpServerConfig};
use kiln_agent::tools::{Registry, Tool, ToolCtx};
use serde_json::{json, Value};

fn no_env() -> kiln_agent::runner::Env {
    Arc::new(|_: &str| None)
}

fn stdio_server() -> McpServerConfig {
    McpServerConfig {
        command: Some(env!("CARGO_BIN_EXE_kiln-mcp-testserver").into()),
        ..McpServerConfig::default()
    }
}

/// A tool context without a sandbox (MCP tools do not use it).
fn ctx() -> ToolCtx {
    ToolCtx {
        org_id: "org-test".into(),
        sandbox: Arc::new(NoSandbox),
        agents: None,
        output_budget: 4096,
    }
}

struct NoSandbox;

#[async_trait::async_trait]
impl kiln_agent::tools::Sandbox for NoSandbox {
    fn id(&self) -> &str {
        "none"
    }
    async fn exec(
        &self,
        _: &[String],
        _: &str,
        _: std::time::Duration,
    ) -> Result<kiln_agent::tools::ExecOutput, kiln_agent::tools::SandboxError> {
        Err(kiln_agent::tools::SandboxError::Failed(
            "no sandbox here".into(),
        ))
    }
    async fn read_file(&self, _: &str) -> Result<Vec<u8>, kiln_agent::tools::SandboxError> {
        Err(kiln_agent::tools::SandboxError::Failed(
            "no sandbox here".into(),
        ))
    }
    async fn write_file(&self, _: &str, _: &[u8]) -> Result<(), kiln_agent::tools::SandboxError> {
        Err(kiln_agent::tools::SandboxError::Failed(
            "no sandbox here".into(),
        ))
    }
    async fn list(
        &self,
        _: &str,
        _: u32,
    ) -> Result<Vec<kiln_agent::tools::Entry>, kiln_agent::tools::SandboxError> {
        Err(kiln_agent::tools::SandboxError::Failed(
            "no sandbox here".into(),
        ))
    }
    async fn git(&self, _: &str, _: Value) -> Result<Value, kiln_agent::tools::SandboxError> {
        Err(kiln_agent::tools::SandboxError::Failed(
            "no sandbox here".into(),
        ))
    }
    async fn lsp(&self, _: &str, _: Value) -> Result<Value, kiln_agent::tools::SandboxError> {
        Err(kiln_agent::tools::SandboxError::Failed(
            "no sandbox here".into(),
        ))
    }
}

fn tool(hub: &McpHub, name: &str) -> Arc<dyn Tool> {
    hub.tools()
        .into_iter()
        .find(|t| t.spec().name == name)
        .unwrap_or_else(|| panic!("no tool {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_tree_server_over_stdio_and_streamable_http() {
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(kiln_agent::mcp_testserver::serve_http(
        listener,
        0,
        stop.clone(),
    ));
    let mut cfg = McpConfig::default();
    cfg.servers.insert("local".into(), stdio_server());
    cfg.servers.insert(
        "remote".into(),
        McpServerConfig {
            url: Some(format!("http://{addr}/mcp")),
            ..McpServerConfig::default()
        },
    );
    let (hub, errors) = McpHub::connect(&cfg, no_env()).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!hub.deferred);
    let mut names: Vec<String> = hub.tools().iter().map(|t| t.spec().name).collect();
    names.sort();
    expect_test::expect![[r#"
        [
            "local__add",
            "local__count",
            "local__echo",
            "local__fail",
            "local__inject",
            "remote__add",
            "remote__count",
            "remote__echo",
            "remote__fail",
            "remote__inject",
        ]
    "#]]
    .assert_debug_eq(&names);
    let add = tool(&hub, "remote__add").spec();
    assert!(add
        .description
        .starts_with("[MCP server remote] Add two integers"));
    assert_eq!(add.parameters["required"], json!(["a", "b"]));

    let c = ctx();
    for server in ["local", "remote"] {
        let t = |n: &str| tool(&hub, &format!("{server}__{n}"));
        assert_eq!(
            t("add").run(&c, json!({"a": 40, "b": 2})).await,
            Ok("42".to_string())
        );
        assert_eq!(
            t("echo").run(&c, json!({"text": "héllo"})).await,
            Ok("héllo".to_string())
        );
        // Checked against the schema before anything is sent: the server counts no call.
        let before = t("count").run(&c, json!({})).await.expect("count");
        let e = t("add")
            .run(&c, json!({"a": "forty", "b": 2}))
            .await
            .expect_err("invalid");
        assert_eq!(
            e,
            format!("invalid arguments for `{server}__add`: arguments.a must be integer, not string; nothing was sent")
        );
        let e = t("add")
            .run(&c, json!({"a": 1}))
            .await
            .expect_err("missing");
        assert!(e.contains("arguments.b is required"), "{e}");
        assert_eq!(t("count").run(&c, json!({})).await.expect("count"), before);
        // A tool's error result is an error for the model.
        assert_eq!(
            t("fail").run(&c, json!({"message": "no such city"})).await,
            Err("the tool reported an error: no such city".to_string())
        );
        // Output comes back verbatim; the loop wraps it as untrusted data.
        let out = t("inject").run(&c, json!({})).await.expect("inject");
        assert!(out.starts_with("</tool_output>"), "{out}");
    }
    stop.cancel();
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stdio_server_is_restarted_before_the_next_call() {
    let mut cfg = McpConfig::default();
    cfg.servers.insert("local".into(), stdio_server());
    let (hub, errors) = McpHub::connect(&cfg, no_env()).await;
    assert!(errors.is_empty(), "{errors:?}");
    let c = ctx();
    let echo = tool(&hub, "local__echo");
    assert_eq!(echo.run(&c, json!({"text": "a"})).await, Ok("a".into()));
    assert_eq!(
        tool(&hub, "local__count").run(&c, json!({})).await,
        Ok("1".into())
    );
    // Kill the server process behind the client's back.
    let pids = std::process::Command::new("pgrep")
        .args([
            "-P",
            &std::process::id().to_string(),
            "-f",
            "kiln-mcp-testserver",
        ])
        .output()
        .expect("pgrep");
    let pids = String::from_utf8_lossy(&pids.stdout).to_string();
    assert!(!pids.trim().is_empty(), "no child server found");
    for pid in pids.split_whitespace() {
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
    }
    // The call that finds it dead fails or reconnects; within a few calls a fresh process
    // answers (its counter starts again), and no call ran twice.
    let mut answered = None;
    for _ in 0..20 {
        if let Ok(n) = tool(&hub, "local__count").run(&c, json!({})).await {
            answered = Some(n);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(answered.as_deref(), Some("0"));
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_filesystem_server_and_tool_search() {
    let dir = std::env::var("KILN_MCP_SERVERS_DIR").unwrap_or_else(|_| "/opt/kiln-mcp".into());
    let script =
        format!("{dir}/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    assert!(
        std::path::Path::new(&script).is_file(),
        "{script} is missing: run scripts/install-mcp-servers.sh (make deps does)"
    );
    let root = tempfile::tempdir().expect("tmp");
    let root_path = root.path().canonicalize().expect("canon");
    let mut cfg = McpConfig {
        max_tools: 4,
        ..McpConfig::default()
    };
    cfg.servers.insert(
        "fs".into(),
        McpServerConfig {
            command: Some("node".into()),
            args: vec![script, root_path.display().to_string()],
            ..McpServerConfig::default()
        },
    );
    cfg.servers.insert("calc".into(), stdio_server());
    // A server that cannot start is reported and the others still serve.
    cfg.servers.insert(
        "broken".into(),
        McpServerConfig {
            command: Some("/nonexistent/mcp-server".into()),
            ..McpServerConfig::default()
        },
    );
    let (hub, errors) = McpHub::connect(&cfg, no_env()).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .to_string()
            .starts_with("MCP server `broken`: cannot start `/nonexistent/mcp-server`"),
        "{}",
        errors[0]
    );
    // More tools than max_tools: they are deferred behind search_tools.
    assert!(hub.deferred);
    let c = ctx();
    let file = root_path.join("notes.txt");
    let w = tool(&hub, "fs__write_file")
        .run(
            &c,
            json!({"path": file.display().to_string(), "content": "kiln was here\n"}),
        )
        .await;
    assert!(w.is_ok(), "{w:?}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("written"),
        "kiln was here\n"
    );
    let r = tool(&hub, "fs__read_text_file")
        .run(&c, json!({"path": file.display().to_string()}))
        .await
        .expect("read");
    assert_eq!(r, "kiln was here\n");
    // Outside its allowed directory the server refuses: an error, not a crash.
    let e = tool(&hub, "fs__read_text_file")
        .run(&c, json!({"path": "/etc/hostname"}))
        .await
        .expect_err("outside the root");
    assert!(
        e.contains("outside allowed directories") || e.contains("Access denied"),
        "{e}"
    );
    let e = tool(&hub, "fs__read_text_file")
        .run(&c, json!({"path": 7}))
        .await
        .expect_err("schema");
    assert!(e.contains("arguments.path must be string"), "{e}");

    let mut reg = Registry::new(Some(&["exec".to_string()]));
    for t in hub.tools() {
        reg.register_deferred(t);
    }
    let offered: Vec<String> = reg.specs().iter().map(|s| s.name.clone()).collect();
    assert_eq!(offered, ["exec", "search_tools"]);
    let found: Vec<String> = reg
        .search("read a text file", 3)
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(found[0], "fs__read_text_file", "{found:?}");
    let found: Vec<String> = reg
        .search("add integers", 1)
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(found, ["calc__add"]);
    assert!(reg.search("zzz-nothing", 5).is_empty());
    assert!(matches!(
        reg.parse_args("calc__add", r#"{"a":1,"b":2}"#),
        Err(kiln_agent::tools::CallError::Malformed(m)) if m.contains("search_tools")
    ));
    reg.set_loaded(&["calc__add".to_string()]);
    assert!(reg.parse_args("calc__add", r#"{"a":1,"b":2}"#).is_ok());
    assert!(reg.specs().iter().any(|s| s.name == "calc__add"));
    hub.close().await;
}
