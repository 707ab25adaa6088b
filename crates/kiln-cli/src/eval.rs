//! `kiln eval run SUITE --model M`: the evaluation harness. Each task of the suite (a
//! directory like the repository's `evals/kiln`, or `humaneval`) runs in a fresh sandbox of
//! its template: the fixture is copied into /workspace, an agent run gets the task text, and
//! the task's verification command decides success. Reports per task and in total: success
//! rate, steps, tokens, cost and time; a progress bar on a TTY, plain lines otherwise, JSON
//! lines with `--json`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use kiln_agent::eval::{self, EvalTask, Summary, TaskResult};
use kiln_protocol::api::{CreateSandbox, Sandbox};
use reqwest::Method;
use serde_json::{json, Value};

use crate::api::Api;
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum EvalCmd {
    /// Run a suite against a model and report success rate, steps, tokens, cost and time
    Run(RunArgs),
    /// List the tasks of a suite
    Ls {
        /// A suite directory (e.g. evals/kiln) or `humaneval`
        suite: String,
        #[arg(long, env = "KILN_DATASET_DIR")]
        dataset_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A suite directory (e.g. evals/kiln: one directory per task with task.toml, repo/,
    /// solution/) or `humaneval` (the HumanEval problems from the dataset directory)
    pub suite: String,
    /// Model as provider/model, e.g. ollama/qwen2.5-coder:7b
    #[arg(long)]
    pub model: String,
    /// Tasks run at the same time
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Agent profile
    #[arg(long, default_value = "coder")]
    pub profile: String,
    /// Only tasks whose id matches one of these comma-separated patterns (`*` wildcards,
    /// e.g. 'py-*,rs-fix-*')
    #[arg(long)]
    pub filter: Option<String>,
    /// At most this many tasks (after --filter)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Step budget per task
    #[arg(long, default_value_t = 30)]
    pub max_steps: u64,
    /// Wall-time budget per agent run, e.g. 10m
    #[arg(long, default_value = "15m")]
    pub max_time: String,
    /// Cost cap per task in USD (prices from the agent config)
    #[arg(long)]
    pub max_cost: Option<f64>,
    /// Memory of each sandbox, e.g. 1G [default: the server's]
    #[arg(long)]
    pub memory: Option<String>,
    /// Where `humaneval` is read from (<dir>/human-eval/HumanEval.jsonl)
    #[arg(long, env = "KILN_DATASET_DIR")]
    pub dataset_dir: Option<PathBuf>,
    /// Keep each task's sandbox (its id is in the result)
    #[arg(long)]
    pub keep: bool,
    /// One JSON object per task, then the summary
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, cmd: EvalCmd) -> Result<i32> {
    match cmd {
        EvalCmd::Ls {
            suite,
            dataset_dir,
            json,
        } => {
            let s = load(&suite, dataset_dir)?;
            for t in &s.tasks {
                if json {
                    println!(
                        "{}",
                        json!({"id": t.id, "language": t.language, "kind": t.kind,
                            "template": t.template, "prompt": t.prompt, "verify": t.verify})
                    );
                } else {
                    println!(
                        "{:<28} {:<11} {:<11} {}",
                        t.id,
                        t.language,
                        t.kind,
                        t.prompt.lines().next().unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        EvalCmd::Run(a) => run_suite(&g.api(), a).await,
    }
}

fn load(suite: &str, dataset_dir: Option<PathBuf>) -> Result<eval::Suite> {
    let dataset_dir = dataset_dir.or_else(|| Some(PathBuf::from("/var/lib/kiln/datasets")));
    eval::load(suite, dataset_dir.as_deref()).map_err(|e| {
        anyhow!(
            "{e} (hint: `kiln eval run evals/kiln ...` from the repository, or `humaneval` after scripts/install-knowledge-data.sh)"
        )
    })
}

struct Opts {
    model: String,
    profile: String,
    budget: Value,
    memory: Option<String>,
    keep: bool,
}

async fn run_suite(api: &Api, a: RunArgs) -> Result<i32> {
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let mut suite = load(&a.suite, a.dataset_dir.clone())?;
    if let Some(f) = &a.filter {
        let pats: Vec<String> = f.split(',').map(|p| p.trim().to_string()).collect();
        suite
            .tasks
            .retain(|t| kiln_agent::tools::allowed_by(&pats, &t.id));
    }
    if let Some(n) = a.limit {
        suite.tasks.truncate(n);
    }
    if suite.tasks.is_empty() {
        bail!(
            "no task of `{}` matches (hint: `kiln eval ls {}`)",
            a.suite,
            a.suite
        );
    }
    let wall = kiln_server::units::parse_duration(&a.max_time)
        .map_err(|e| anyhow!("--max-time {}: {e} (hint: e.g. 90s, 10m)", a.max_time))?;
    if let Some(m) = &a.memory {
        kiln_server::units::parse_size(m)
            .map_err(|e| anyhow!("--memory {m}: {e} (hint: e.g. 512M, 2G)"))?;
    }
    let mut budget = json!({"max_steps": a.max_steps, "max_wall_secs": wall.as_secs_f64()});
    if let Some(c) = a.max_cost {
        budget["max_cost_usd"] = json!(c);
    }
    let opts = Opts {
        model: a.model.clone(),
        profile: a.profile.clone(),
        budget,
        memory: a.memory.clone(),
        keep: a.keep,
    };
    let n = suite.tasks.len();
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(n as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tasks {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    });
    if !a.json {
        let line = format!(
            "eval {}: {n} tasks on {} ({} at a time)",
            suite.name, a.model, a.parallel
        );
        match &bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }
    let t0 = Instant::now();
    let mut results: Vec<TaskResult> = Vec::new();
    let mut passed = 0usize;
    let mut stream = futures_util::stream::iter(suite.tasks.iter())
        .map(|t| run_task(api, t, &opts))
        .buffer_unordered(a.parallel);
    while let Some(r) = stream.next().await {
        passed += usize::from(r.success);
        if a.json {
            let mut v = serde_json::to_value(&r)?;
            v["type"] = json!("task");
            println!("{v}");
        } else {
            let line = format!(
                "{} {:<28} {:<20} {:>3} steps {:>8} tokens  ${:.4}  {:>6.1} s{}",
                if r.success { "PASS" } else { "FAIL" },
                r.task,
                r.reason,
                r.steps,
                r.input_tokens + r.output_tokens,
                r.cost_usd,
                r.seconds,
                r.detail
                    .as_deref()
                    .filter(|_| !r.success)
                    .map(|d| format!("  ({})", one_line_tail(d)))
                    .unwrap_or_default()
            );
            match &bar {
                Some(b) => {
                    b.println(line);
                    b.inc(1);
                    b.set_message(format!("{passed} passed"));
                }
                None => println!("{line}"),
            }
        }
        results.push(r);
    }
    drop(stream);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    results.sort_by(|x, y| x.task.cmp(&y.task));
    let s = eval::summarize(&suite.name, &a.model, &results, t0.elapsed().as_secs_f64());
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        v["type"] = json!("summary");
        println!("{v}");
    } else {
        print_summary(&s);
    }
    Ok(0)
}

fn one_line_tail(s: &str) -> String {
    let last = s
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim();
    last.chars().take(120).collect()
}

fn print_summary(s: &Summary) {
    println!(
        "{}: {}/{} tasks passed ({:.1} %) on {}; {} steps, {} input + {} output tokens, ${:.4}; {:.1} s of task time, {:.1} s wall",
        s.suite,
        s.passed,
        s.tasks,
        s.success_rate * 100.0,
        s.model,
        s.steps,
        s.input_tokens,
        s.output_tokens,
        s.cost_usd,
        s.task_seconds,
        s.wall_seconds
    );
}

/// Runs one task; failures of the harness itself become a failed result with a reason.
async fn run_task(api: &Api, t: &EvalTask, o: &Opts) -> TaskResult {
    let t0 = Instant::now();
    let mut r = TaskResult {
        task: t.id.clone(),
        ..TaskResult::default()
    };
    let sb = match create(api, &t.template, o.memory.clone()).await {
        Ok(sb) => sb,
        Err(e) => {
            r.reason = "error".into();
            r.detail = Some(format!("creating a {} sandbox: {e:#}", t.template));
            r.seconds = t0.elapsed().as_secs_f64();
            return r;
        }
    };
    if let Err(e) = attempt(api, t, o, &sb.id, &mut r).await {
        r.success = false;
        if r.reason.is_empty() {
            r.reason = "error".into();
        }
        r.detail = Some(format!("{e:#}"));
    }
    if !o.keep {
        let _ = api
            .empty(Method::DELETE, &format!("/v1/sandboxes/{}", sb.id))
            .await;
    } else {
        r.detail = Some(format!(
            "sandbox {} kept{}",
            sb.id,
            r.detail
                .as_deref()
                .map(|d| format!("; {d}"))
                .unwrap_or_default()
        ));
    }
    r.seconds = t0.elapsed().as_secs_f64();
    r
}

async fn create(api: &Api, template: &str, memory: Option<String>) -> Result<Sandbox> {
    let req = CreateSandbox {
        template: Some(template.into()),
        memory: memory.map(kiln_protocol::api::SizeArg::Text),
        labels: [("kiln.eval".to_string(), "true".to_string())].into(),
        ..CreateSandbox::default()
    };
    api.json(Method::POST, "/v1/sandboxes", Some(&req)).await
}

async fn put_files(api: &Api, sb: &str, files: &[(String, Vec<u8>)]) -> Result<()> {
    for (rel, data) in files {
        crate::agent::upload(api, sb, &format!("/workspace/{rel}"), data.clone()).await?;
    }
    Ok(())
}

async fn attempt(api: &Api, t: &EvalTask, o: &Opts, sb: &str, r: &mut TaskResult) -> Result<()> {
    put_files(api, sb, &t.files).await?;
    let body = json!({"task": t.prompt, "profile": o.profile, "model": o.model,
        "sandbox": sb, "budget": o.budget});
    let run: Value = api.json(Method::POST, "/v1/agents", Some(&body)).await?;
    let id = run["id"].as_str().unwrap_or_default().to_string();
    r.run_id = Some(id.clone());
    let done = loop {
        let v: Value = api
            .json(Method::GET, &format!("/v1/agents/{id}"), None::<&()>)
            .await?;
        if !matches!(
            v["state"].as_str(),
            Some("running") | Some("waiting_approval")
        ) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let s = &done["stats"];
    r.reason = done["reason"].as_str().unwrap_or("unknown").to_string();
    r.steps = s["steps"].as_u64().unwrap_or(0);
    r.input_tokens = s["total_input_tokens"].as_u64().unwrap_or(0);
    r.output_tokens = s["total_output_tokens"].as_u64().unwrap_or(0);
    r.cost_usd = s["total_cost_usd"].as_f64().unwrap_or(0.0);
    // Whatever the run's outcome, the verification decides.
    put_files(api, sb, &t.verify_files).await?;
    let (code, out) = crate::agent::sh_timeout(
        api,
        sb,
        &format!("cd /workspace && {}", t.verify),
        Some(t.timeout_secs),
    )
    .await?;
    r.verify_exit = Some(code);
    r.success = code == 0;
    if !r.success {
        let tail: String = {
            let chars: Vec<char> = out.chars().collect();
            chars[chars.len().saturating_sub(2000)..].iter().collect()
        };
        r.detail = Some(format!("verification exited {code}: {tail}"));
    }
    Ok(())
}
