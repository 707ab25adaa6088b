//! `kiln eval run` end to end: the shipped suite (`evals/kiln`) and HumanEval problems run
//! through a real server, real sandboxes of each task's template and the scripted model, whose
//! routed turns write each task's known solution, except for one task that gives up: the
//! verification commands decide success, and the totals (success rate, steps, tokens, cost)
//! and the metered agent usage (`kiln usage --by agent`) must add up.
//!
//! Node and Rust tasks need the `node` and `rust` templates: with KILN_TEST_ALL_TEMPLATES=1
//! (CI) they are built (or found in the layer cache) and the whole suite runs; otherwise the
//! Python tasks run (the full suite is `kiln eval run evals/kiln --model ...`).

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_agent::scripted::{ScriptedServer, Turn};
use serde_json::{json, Value};

use crate::{env_path, kiln, text, Server};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Turns that write a task's solution files, then finish.
fn solve(files: &[(String, Vec<u8>)]) -> Vec<Turn> {
    let calls: Vec<(String, String, Value)> = files
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            (
                format!("w{i}"),
                "write_file".to_string(),
                json!({"path": p, "content": String::from_utf8_lossy(c)}),
            )
        })
        .collect();
    let refs: Vec<(&str, &str, Value)> = calls
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.clone()))
        .collect();
    vec![Turn::calls(&refs), Turn::text("Done: the fix is in place.")]
}

fn jsonl(o: &std::process::Output) -> Vec<Value> {
    text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn eval_suites_run_end_to_end_with_the_scripted_model() {
    let all_templates = std::env::var("KILN_TEST_ALL_TEMPLATES").is_ok_and(|v| v == "1");
    if all_templates {
        for t in ["node", "rust"] {
            let o = Command::new(kiln())
                .args(["template", "build", t, "--images-dir"])
                .arg(env_path("KILN_TEST_IMAGES"))
                .output()
                .expect("kiln template build");
            assert!(o.status.success(), "{t}: {}", text(&o.stderr));
        }
    }
    let suite_dir = repo().join("evals/kiln");
    let suite = kiln_agent::eval::load_dir(&suite_dir).expect("suite");
    let tasks: Vec<&kiln_agent::eval::EvalTask> = suite
        .tasks
        .iter()
        .filter(|t| all_templates || t.template == "python")
        .collect();
    const GIVES_UP: &str = "py-fix-last-n";
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let model = rt.block_on(ScriptedServer::start(vec![])).expect("model");
    for t in &tasks {
        if t.id == GIVES_UP {
            model.route(&t.prompt, [Turn::text("I could not find the bug.")]);
        } else {
            model.route(&t.prompt, solve(&t.solution));
        }
    }
    let cfg = tempfile::tempdir().expect("tmp");
    let cfg_file = cfg.path().join("agents.toml");
    std::fs::write(
        &cfg_file,
        format!(
            "[providers.scripted]\nprotocol = \"openai\"\nbase_url = \"{}/v1\"\n\n\
             [models.\"scripted/m\"]\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n",
            model.url()
        ),
    )
    .expect("config");
    let s = Server::start(&["--agent-config", cfg_file.to_str().expect("utf-8")]);

    let filter = if all_templates { "*" } else { "py-*" };
    let o = s.run(&[
        "eval",
        "run",
        suite_dir.to_str().expect("utf-8"),
        "--model",
        "scripted/m",
        "--parallel",
        "4",
        "--memory",
        "512M",
        "--filter",
        filter,
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let lines = jsonl(&o);
    let (results, summary) = lines.split_at(lines.len() - 1);
    assert_eq!(results.len(), tasks.len(), "{}", text(&o.stdout));
    for r in results {
        let id = r["task"].as_str().expect("task");
        let want = id != GIVES_UP;
        assert_eq!(r["success"], want, "{r}");
        assert_eq!(r["reason"], "done", "{r}");
        assert_eq!(r["steps"], if want { 2 } else { 1 }, "{r}");
        if !want {
            assert_ne!(r["verify_exit"], 0, "{r}");
            assert!(
                r["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("verification exited"),
                "{r}"
            );
        }
    }
    let n = tasks.len() as u64;
    let s0 = &summary[0];
    assert_eq!(s0["type"], "summary");
    assert_eq!(
        (s0["tasks"].as_u64(), s0["passed"].as_u64()),
        (Some(n), Some(n - 1))
    );
    let rate = s0["success_rate"].as_f64().expect("rate");
    assert!((rate - (n - 1) as f64 / n as f64).abs() < 1e-9, "{s0}");
    // Two scripted turns of 100 in / 20 out per solved task, one for the task that gave up.
    let input = 200 * (n - 1) + 100;
    let output = 40 * (n - 1) + 20;
    assert_eq!(s0["steps"], 2 * (n - 1) + 1);
    assert_eq!(
        (s0["input_tokens"].as_u64(), s0["output_tokens"].as_u64()),
        (Some(input), Some(output))
    );
    let cost = (input as f64 + 2.0 * output as f64) / 1e6;
    assert!(
        (s0["cost_usd"].as_f64().expect("cost") - cost).abs() < 1e-9,
        "{s0}"
    );
    // Every sandbox is gone.
    let ls: Value =
        serde_json::from_slice(&s.run(&["sandbox", "ls", "--json"]).stdout).expect("ls json");
    assert_eq!(ls["sandboxes"].as_array().map(Vec::len), Some(0), "{ls}");

    // The runs' tokens and cost were metered into the control plane's usage, per run.
    let o = s.run(&["usage", "--by", "agent", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let u: Value = serde_json::from_slice(&o.stdout).expect("usage json");
    assert_eq!(u["total"]["input_tokens"].as_u64(), Some(input), "{u}");
    assert_eq!(u["total"]["output_tokens"].as_u64(), Some(output), "{u}");
    let runs: std::collections::BTreeSet<&str> = u["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .filter_map(|b| b["group"].as_str())
        .collect();
    assert_eq!(runs.len() as u64, n, "{u}");
    let o = s.run(&["usage", "--by", "model"]);
    assert!(
        text(&o.stdout).contains("scripted/m"),
        "{}",
        text(&o.stdout)
    );

    // HumanEval: the first three problems; two get their canonical solution, one a wrong one.
    let datasets = env_path("KILN_DATASET_DIR");
    let he = kiln_agent::eval::load("humaneval", Some(&datasets)).expect("humaneval");
    assert_eq!(he.tasks.len(), 164);
    for (i, t) in he.tasks.iter().take(3).enumerate() {
        if i == 1 {
            let wrong = vec![(
                "solution.py".to_string(),
                b"def nothing():\n    return None\n".to_vec(),
            )];
            model.route(&t.prompt, solve(&wrong));
        } else {
            model.route(&t.prompt, solve(&t.solution));
        }
    }
    let o = s.run(&[
        "eval",
        "run",
        "humaneval",
        "--dataset-dir",
        datasets.to_str().expect("utf-8"),
        "--model",
        "scripted/m",
        "--limit",
        "3",
        "--parallel",
        "3",
    ]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    assert_eq!(out.matches("PASS ").count(), 2, "{out}");
    assert_eq!(out.matches("FAIL ").count(), 1, "{out}");
    assert!(
        out.contains("humaneval: 2/3 tasks passed (66.7 %)"),
        "{out}"
    );

    crate::one_line_error(
        &s.run(&["eval", "run", "no-such-suite", "--model", "scripted/m"]),
        125,
        "no suite `no-such-suite`",
    );
    s.remove_all();
    s.stop();
}
