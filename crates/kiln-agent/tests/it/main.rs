//! Integration tests of the providers against the scripted model server over real HTTP:
//! streaming assembly of text and (parallel) tool calls for the OpenAI, Ollama and Anthropic
//! protocols, what each request carried (Ollama's `num_ctx`, keys in headers only), errors.
//! `mcp`: the MCP client against real servers; `bus`: the NATS message bus.

mod bus;
mod mcp;

use kiln_agent::config::AgentConfig;
use kiln_agent::model::{ChatRequest, Message, ToolCall, ToolSpec};
use kiln_agent::provider::{ApiKey, Endpoint, Protocol, Provider};
use kiln_agent::scripted::{ScriptedServer, Turn};
use serde_json::json;

fn req() -> ChatRequest {
    ChatRequest {
        model: "m".into(),
        messages: vec![
            Message::system("be brief"),
            Message::user("list files"),
            Message::assistant(
                "",
                vec![ToolCall {
                    id: "c0".into(),
                    name: "list".into(),
                    arguments: "{}".into(),
                }],
            ),
            Message::tool(
                &ToolCall {
                    id: "c0".into(),
                    name: "list".into(),
                    arguments: "{}".into(),
                },
                "a.py",
            ),
        ],
        tools: vec![ToolSpec {
            name: "exec".into(),
            description: "run".into(),
            parameters: json!({"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}),
        }],
        context_window: 12_345,
        max_output_tokens: 256,
    }
}

fn provider(protocol: Protocol, s: &ScriptedServer, key: Option<&str>) -> Provider {
    let base_url = match protocol {
        Protocol::Openai => format!("{}/v1", s.url()),
        _ => s.url(),
    };
    Provider::new(Endpoint {
        name: format!("{protocol:?}").to_lowercase(),
        protocol,
        base_url,
        api_key: key.map(ApiKey::new),
    })
}

#[tokio::test]
async fn every_protocol_streams_text_and_parallel_tool_calls() {
    for protocol in [Protocol::Openai, Protocol::Ollama, Protocol::Anthropic] {
        let s = ScriptedServer::start(vec![
            Turn::text("Hello there, all done.").usage(321, 12),
            Turn::calls(&[
                ("call_a", "exec", json!({"cmd": "ls -la"})),
                ("call_b", "read_file", json!({"path": "ü.py"})),
            ])
            .usage(400, 30),
        ])
        .await
        .expect("server");
        let p = provider(protocol, &s, Some("sk-test-123"));
        let r = p.chat(&req()).await.expect("chat");
        assert_eq!(r.text, "Hello there, all done.", "{protocol:?}");
        assert!(r.tool_calls.is_empty());
        assert_eq!((r.input_tokens, r.output_tokens), (321, 12), "{protocol:?}");
        let r = p.chat(&req()).await.expect("chat");
        let calls: Vec<(String, serde_json::Value)> = r
            .tool_calls
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    serde_json::from_str(&c.arguments).expect("json args"),
                )
            })
            .collect();
        assert_eq!(
            calls,
            vec![
                ("exec".to_string(), json!({"cmd": "ls -la"})),
                ("read_file".to_string(), json!({"path": "ü.py"}))
            ],
            "{protocol:?}"
        );
        if protocol != Protocol::Ollama {
            assert_eq!(r.tool_calls[0].id, "call_a");
            assert_eq!(r.tool_calls[1].id, "call_b");
        }
        assert_eq!((r.input_tokens, r.output_tokens), (400, 30), "{protocol:?}");
        let reqs = s.requests();
        assert_eq!(reqs.len(), 2);
        let body = &reqs[0].body;
        assert_eq!(body["stream"], true);
        match protocol {
            Protocol::Openai => {
                assert_eq!(reqs[0].path, "/v1/chat/completions");
                assert_eq!(reqs[0].credential.as_deref(), Some("sk-test-123"));
                assert_eq!(body["stream_options"]["include_usage"], true);
                assert_eq!(body["tools"][0]["function"]["name"], "exec");
                assert_eq!(body["messages"][3]["role"], "tool");
                assert_eq!(body["messages"][3]["tool_call_id"], "c0");
            }
            Protocol::Ollama => {
                assert_eq!(reqs[0].path, "/api/chat");
                // Never left to Ollama's small default, which truncates silently.
                assert_eq!(body["options"]["num_ctx"], 12_345);
                assert_eq!(
                    body["messages"][2]["tool_calls"][0]["function"]["arguments"],
                    json!({})
                );
                assert_eq!(body["messages"][3]["tool_name"], "list");
            }
            Protocol::Anthropic => {
                assert_eq!(reqs[0].path, "/v1/messages");
                assert_eq!(reqs[0].credential.as_deref(), Some("sk-test-123"));
                assert_eq!(body["system"], "be brief");
                assert_eq!(body["max_tokens"], 256);
                assert_eq!(body["tools"][0]["input_schema"]["required"], json!(["cmd"]));
                assert_eq!(body["messages"][1]["content"][0]["type"], "tool_use");
                assert_eq!(body["messages"][2]["content"][0]["type"], "tool_result");
                assert_eq!(body["messages"][2]["content"][0]["tool_use_id"], "c0");
            }
        }
        // Keys travel in headers only, never in a body.
        assert!(!body.to_string().contains("sk-test-123"));
    }
}

#[tokio::test]
async fn errors_name_the_provider_and_status() {
    let s = ScriptedServer::start(vec![]).await.expect("server");
    let p = provider(Protocol::Openai, &s, None);
    let e = p.chat(&req()).await.expect_err("exhausted script");
    let m = e.to_string();
    assert!(
        m.contains("openai answered 500") && m.contains("script exhausted"),
        "{m}"
    );
    let dead = Provider::new(Endpoint {
        name: "ollama".into(),
        protocol: Protocol::Ollama,
        base_url: "http://127.0.0.1:9".into(),
        api_key: None,
    });
    let m = dead.chat(&req()).await.expect_err("refused").to_string();
    assert!(
        m.starts_with("cannot reach ollama at http://127.0.0.1:9/api/chat"),
        "{m}"
    );
}

#[tokio::test]
async fn providers_resolve_from_the_ecosystem_variables() {
    let s = ScriptedServer::start(vec![Turn::text("hi")])
        .await
        .expect("server");
    let url = s.url();
    let env = move |k: &str| match k {
        "ANTHROPIC_BASE_URL" => Some(url.clone()),
        "ANTHROPIC_API_KEY" => Some("ak-9".into()),
        _ => None,
    };
    let (p, model) = AgentConfig::default()
        .provider("anthropic/claude-x", &env)
        .expect("provider");
    assert_eq!(model, "claude-x");
    let mut r = req();
    r.model = model;
    assert_eq!(p.chat(&r).await.expect("chat").text, "hi");
    assert_eq!(s.requests()[0].credential.as_deref(), Some("ak-9"));
    assert_eq!(s.requests()[0].body["model"], "claude-x");
}
