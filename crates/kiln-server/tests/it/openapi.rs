//! The OpenAPI document: it describes every route, is a valid OpenAPI 3.1 document
//! (`openapi-spec-validator`), is what `/openapi.json` serves, and holds against the live
//! server under `schemathesis` (no 5xx, every answer's status, content type and body as
//! described), bounded in examples and time.

use std::path::PathBuf;
use std::process::Command;

use kiln_protocol::api::CreateSandbox;
use serde_json::json;

use crate::harness;

fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("KILN_TOOLS_DIR").unwrap_or_else(|_| "/opt/kiln-tools".into());
    let p = PathBuf::from(dir).join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing (hint: run scripts/install-tools.sh, which `make test` does)",
        p.display()
    );
    p
}

#[test]
fn every_route_is_described_and_the_document_is_valid_openapi_3_1() {
    let described = kiln_server::openapi::described();
    let mut missing = Vec::new();
    for (method, route) in kiln_server::http::ROUTES {
        let p = kiln_server::openapi::openapi_path(route);
        if !described.contains(&(method.to_string(), p.clone())) {
            missing.push(format!("{method} {p}"));
        }
    }
    assert!(
        missing.is_empty(),
        "routes without an OpenAPI operation: {missing:?}"
    );
    // Every described operation exists: authenticated ones are in ROUTES, plus the three
    // open ones.
    let routed: Vec<(String, String)> = kiln_server::http::ROUTES
        .iter()
        .map(|(m, r)| (m.to_string(), kiln_server::openapi::openapi_path(r)))
        .chain(
            [
                ("GET", "/v1/health"),
                ("GET", "/metrics"),
                ("GET", "/openapi.json"),
            ]
            .map(|(m, p)| (m.to_string(), p.to_string())),
        )
        .collect();
    let extra: Vec<_> = described.iter().filter(|d| !routed.contains(d)).collect();
    assert!(extra.is_empty(), "described but not routed: {extra:?}");

    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("openapi.json");
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(kiln_server::openapi::spec()).expect("json"),
    )
    .expect("write");
    let out = Command::new(tool("openapi-spec-validator"))
        .arg(&file)
        .output()
        .expect("openapi-spec-validator");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn schemathesis_finds_no_server_errors_or_schema_violations() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    // Served as described, without a key.
    let served: serde_json::Value = reqwest::get(s.url("/openapi.json"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(&served, kiln_server::openapi::spec());
    // A live sandbox, and rate limits that let the fuzzer through.
    let _live = s.create(&CreateSandbox::default()).await;
    let org = s.kiln.system_org.clone();
    let fast = json!({"per_sec": 10000.0, "burst": 10000});
    let r = s
        .http
        .put(s.url(&format!("/v1/orgs/{org}/rate-limits")))
        .json(&json!({"manage": fast, "create": fast, "sandbox": fast}))
        .send()
        .await
        .expect("rate limits");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());

    let report = dir.path().join("report");
    let url = s.url("/openapi.json");
    let token = s.kiln.token.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(tool("schemathesis"))
            .args(["run", &url, "--url", &url.replace("/openapi.json", "")])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "10",
                "--max-time",
                "150",
                "--workers",
                "1",
                "--seed",
                "7",
                "--request-timeout",
                "30",
                "--suppress-health-check",
                "all",
                "--generation-database",
                "none",
                "--no-color",
            ])
            // Excluded (one filter: schemathesis ANDs filters of different kinds): templates
            // are shared by the whole machine's test suite (building or removing one is not for
            // a fuzzer); WebSockets, previews and endless streams (file and port watches, agent
            // events) are not request/answer exchanges; indexing a host directory walks
            // whatever path it is given; revoking keys and changing the caller's own org's rate
            // limits or quota cut the run's own branch (the fuzzer learns ids from answers).
            .args([
                "--exclude-operation-id-regex",
                "^([a-z]+_v1_templates_.+|.*_pty|.*_lsp_ws|.*_ports.*|.*_files_watch|.*_agents__id__events|post_v1_indexes|delete_v1_keys__id_|put_v1_orgs__org__rate_limits|put_v1_orgs__org__quota)$",
            ])
            .arg("--report-dir")
            .arg(&report)
            .env("NO_COLOR", "1")
            .output()
            .expect("schemathesis")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server still serves after the run (the fuzzer may have removed the sandbox: it
    // learns ids from listings).
    let r = s
        .http
        .get(s.url("/v1/sandboxes"))
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 200);
    s.teardown().await;
}
