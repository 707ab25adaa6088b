//! `kiln agent` end to end: `kiln up --agent-config` with a provider pointing at the scripted
//! model server, a run on a copy of a local directory with the diff shown and applied only with
//! `--apply`, exit codes, listing, showing and replaying runs, and one-line errors.

use crate::{one_line_error, text, Server};
use kiln_agent::scripted::{ScriptedServer, Turn};
use serde_json::json;

#[test]
fn agent_run_on_a_local_directory_shows_and_applies_the_diff() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let model = rt
        .block_on(ScriptedServer::start(vec![
            Turn::call(
                "c1",
                "edit",
                json!({"path": "calc.py", "old": "return a - b", "new": "return a + b"}),
            ),
            Turn::text("Fixed add()."),
            // The second run (with --apply) does the same.
            Turn::call(
                "c2",
                "edit",
                json!({"path": "calc.py", "old": "return a - b", "new": "return a + b"}),
            ),
            Turn::call("c3", "exec", json!({"cmd": "rm notes.txt && echo gone"})),
            Turn::text("Fixed add() and removed the notes."),
            // The third run stops on its step budget.
            Turn::call("c4", "exec", json!({"cmd": "true"})),
        ]))
        .expect("model");
    let cfg = tempfile::tempdir().expect("tmp");
    let cfg_file = cfg.path().join("agents.toml");
    std::fs::write(
        &cfg_file,
        format!(
            "[providers.scripted]\nprotocol = \"openai\"\nbase_url = \"{}/v1\"\n",
            model.url()
        ),
    )
    .expect("write config");
    let s = Server::start(&["--agent-config", cfg_file.to_str().expect("utf-8")]);
    let proj = tempfile::tempdir().expect("tmp");
    std::fs::write(
        proj.path().join("calc.py"),
        "def add(a, b):\n    return a - b\n",
    )
    .expect("write");
    std::fs::write(proj.path().join("notes.txt"), "scratch\n").expect("write");
    let dir = proj.path().to_str().expect("utf-8");

    let agent_run = |extra: &[&str], task: &str| {
        let mut args = vec!["agent", "run", "--model", "scripted/m", "--path", dir];
        args.extend_from_slice(extra);
        args.push(task);
        s.run(&args)
    };
    let o = agent_run(&[], "fix add");
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", text(&o.stderr));
    assert!(out.contains("$ edit {"), "{out}");
    assert!(out.contains("■ finished done: Fixed add()."), "{out}");
    assert!(
        out.contains("-    return a - b\n+    return a + b"),
        "{out}"
    );
    assert!(out.contains("not applied: rerun with --apply"), "{out}");
    assert_eq!(
        std::fs::read_to_string(proj.path().join("calc.py")).expect("read"),
        "def add(a, b):\n    return a - b\n"
    );

    let o = agent_run(&["--apply"], "fix add, drop notes");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
    assert!(
        text(&o.stdout).contains("applied to"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(proj.path().join("calc.py")).expect("read"),
        "def add(a, b):\n    return a + b\n"
    );
    assert!(!proj.path().join("notes.txt").exists());

    let o = s.run(&[
        "agent",
        "run",
        "--model",
        "scripted/m",
        "--max-steps",
        "1",
        "--json",
        "loop",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    let last: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().expect("a line")).expect("json");
    assert_eq!(
        (last["type"].as_str(), last["reason"].as_str()),
        (Some("finished"), Some("budget_steps"))
    );
    let run_id = last["run_id"].as_str().expect("run id").to_string();

    let o = s.run(&["agent", "ls"]);
    let ls = text(&o.stdout);
    assert_eq!(ls.lines().count(), 4, "{ls}");
    assert!(ls.contains(&run_id) && ls.contains("budget_steps"), "{ls}");
    let o = s.run(&["agent", "show", &run_id]);
    assert!(
        text(&o.stdout).contains("state     failed (budget_steps)"),
        "{}",
        text(&o.stdout)
    );
    let o = s.run(&["agent", "replay", &run_id]);
    let replay = text(&o.stdout);
    assert!(
        replay.starts_with("[+   0.00s] ▶ coder on scripted/m: loop"),
        "{replay}"
    );
    assert!(replay.contains("■ stopped budget_steps"), "{replay}");

    one_line_error(
        &s.run(&["agent", "run", "--model", "nope", "x"]),
        125,
        "is not `provider/model`",
    );
    one_line_error(
        &s.run(&["agent", "show", "run-missing"]),
        125,
        "no agent run `run-missing`",
    );
    one_line_error(
        &s.run(&["agent", "approve", &run_id, "c9"]),
        125,
        "no pending approval",
    );
    s.remove_all();
    s.stop();
}
