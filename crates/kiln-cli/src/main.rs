//! The `kiln` command: `kiln up` runs the server; every other command is a client of its API.
//!
//! Errors print as one line (`error: what went wrong (hint: how to fix it)`) and exit non-zero:
//! 125 for Kiln's own failures, 2 for bad usage; `exec`/`run` otherwise pass on the exit code of
//! the command that ran in the sandbox (124 if it timed out, 128+N if killed by signal N).

mod admin;
mod agent;
mod api;
mod bench;
mod bench_agent;
mod bench_devtools;
mod bench_knowledge;
mod bench_template;
mod devtools;
mod eval;
mod gitcreds;
mod knowledge;
mod sandbox;
mod shell;
mod ssh;
mod template;
mod up;

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// Exit code for Kiln's own errors (as `docker run` uses 125).
pub const EXIT_KILN_ERROR: i32 = 125;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: development sandboxes for AI agents, self-hosted", long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Command,
}

/// Where the server is and how to authenticate.
#[derive(Args, Clone)]
pub struct Global {
    /// Server URL [default: http://127.0.0.1:7777]
    #[arg(long, env = "KILN_URL", global = true)]
    pub url: Option<String>,
    /// API key (`kiln_...`) [default: the owner key in <data dir>/token]
    #[arg(long, env = "KILN_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory of the local server: where `kiln up` keeps its state, and where the
    /// other commands find its token [default: /var/lib/kiln]
    #[arg(long = "data-dir", env = "KILN_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

impl Global {
    pub fn api(&self) -> api::Api {
        api::Api::from_env(self.url.clone(), self.token.clone(), self.data_dir.clone())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kiln server (builds the base image on first start)
    Up(up::UpArgs),
    /// Create, use and remove sandboxes
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Create a sandbox, run one command in it, remove it; exits with the command's code
    Run(sandbox::RunArgs),
    /// Build, list, inspect, test and remove templates (sandbox images built from Ansible roles)
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// git in a sandbox: clone, status, diff, add, commit, log, branch, checkout, push, pull
    Git(devtools::GitArgs),
    /// Language servers in a sandbox: diagnostics, definition, references, hover, symbols,
    /// completion, rename preview (positions PATH:LINE:COL, 1-based)
    Lsp(devtools::LspArgs),
    /// TCP ports listening in a sandbox (previews: /v1/sandboxes/ID/ports/PORT/)
    Ports(devtools::PortsArgs),
    /// Show or change a sandbox's egress allow-list (network `full`)
    Egress(devtools::EgressArgs),
    /// Organisations and their quotas
    #[command(subcommand)]
    Org(admin::OrgCmd),
    /// API keys: create (with role, scopes, expiry), list, revoke
    #[command(subcommand)]
    Key(admin::KeyCmd),
    /// Read the audit log (owner, admin, auditor)
    Audit(admin::AuditArgs),
    /// Metered usage (sandbox-, CPU-, memory- and disk-seconds, agents' LLM tokens and cost)
    /// by hour or day, or the raw usage events (owner, admin, auditor)
    Usage(admin::UsageArgs),
    /// Agent runs: run a task, list, show, logs, approve, stop, replay
    #[command(subcommand)]
    Agent(agent::AgentCmd),
    /// Evaluation suites: run a suite of tasks (evals/kiln, humaneval) against a model in
    /// fresh sandboxes and report success rate, steps, tokens, cost and time
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// Knowledge indexes: create, sync (--watch), ls, stats, rm
    #[command(subcommand)]
    Index(knowledge::IndexCmd),
    /// Hybrid (BM25 + vector) search of an index
    Search(knowledge::SearchArgs),
    /// The best context for an LLM from an index, within a token budget
    Context(knowledge::ContextArgs),
    /// SSH public keys of your organisation (they open `ssh SANDBOX_ID@HOST -p 2222`)
    #[command(subcommand, name = "ssh-key")]
    SshKey(ssh::SshKeyCmd),
    /// Open an SSH session into a sandbox with the system `ssh` (host key pinned)
    Ssh(ssh::SshArgs),
    /// Print Host entries for ~/.ssh/config (VS Code Remote-SSH, JetBrains Gateway, scp)
    #[command(name = "ssh-config")]
    SshConfig(ssh::SshConfigArgs),
    /// Credentials for https git hosts, stored by the server for your organisation and used
    /// by clone, push and pull in its sandboxes (never written into a sandbox)
    #[command(subcommand, name = "git-credential")]
    GitCredential(gitcreds::GitCredentialCmd),
    /// Measure the platform through the server's API
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Print shell completions
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if !matches!(cli.cmd, Command::Up(_)) {
        // A client command writing into a closed pipe (`kiln sandbox ls | head`) should end
        // quietly like any Unix tool, not panic. The server keeps Rust's default (SIGPIPE
        // ignored) so a closed socket is an error, not death.
        // SAFETY: setting a signal disposition to SIG_DFL before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(EXIT_KILN_ERROR);
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Command::Up(a) => up::run(cli.global.data_dir.clone(), a).await,
            Command::Sandbox(c) => sandbox::run(&cli.global, c).await,
            Command::Run(a) => sandbox::run_once(&cli.global, a).await,
            Command::Template(c) => template::run(&cli.global, c).await,
            Command::Git(a) => devtools::git(&cli.global, a).await,
            Command::Lsp(a) => devtools::lsp(&cli.global, a).await,
            Command::Ports(a) => devtools::ports(&cli.global, a).await,
            Command::Egress(a) => devtools::egress(&cli.global, a).await,
            Command::Org(c) => admin::org(&cli.global, c).await,
            Command::Key(c) => admin::key(&cli.global, c).await,
            Command::Audit(a) => admin::audit(&cli.global, a).await,
            Command::Usage(a) => admin::usage(&cli.global, a).await,
            Command::Agent(c) => agent::run(&cli.global, c).await,
            Command::Eval(c) => eval::run(&cli.global, c).await,
            Command::Index(c) => knowledge::index(&cli.global, c).await,
            Command::Search(a) => knowledge::search(&cli.global, a).await,
            Command::Context(a) => knowledge::context(&cli.global, a).await,
            Command::SshKey(c) => ssh::ssh_key(&cli.global, c).await,
            Command::Ssh(a) => ssh::ssh(&cli.global, a).await,
            Command::SshConfig(a) => ssh::ssh_config(&cli.global, a).await,
            Command::GitCredential(c) => gitcreds::git_credential(&cli.global, c).await,
            Command::Bench(c) => bench::run(&cli.global, c).await,
            Command::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
                Ok(0)
            }
        }
    });
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::exit(EXIT_KILN_ERROR);
        }
    }
}

/// An error chain as one line: `outer: inner: cause`.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}
