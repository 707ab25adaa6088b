//! git in a sandbox, run through kilnd with typed results: status parsed from
//! `--porcelain=v2 -z`, per-file unified diffs, log, branches, add/commit, and clone, push
//! and pull whose credentials are handed to git through kilnd's credential relay (see
//! `kilnd`'s `daemon/creds`): they live on the host and are given per request, never written
//! into the sandbox. Failures are classified into [`GitError`] variants with git's own
//! message attached (git runs with `LC_ALL=C` so the messages are stable).

use std::collections::BTreeMap;

use kiln_protocol::kilnd::{ExecSpec, Reply, StreamKind};
use kilnd::{Client, ClientError};
use serde::{Deserialize, Serialize};

/// What went wrong, with git's message.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("not a git repository: {path}")]
    NotARepository { path: String, message: String },
    #[error("authentication failed: {message}")]
    AuthFailed { message: String },
    #[error("push rejected (non-fast-forward: pull first): {message}")]
    NonFastForward { message: String },
    #[error("merge conflict in {}", paths.join(", "))]
    MergeConflict { paths: Vec<String>, message: String },
    #[error("nothing to commit")]
    NothingToCommit { message: String },
    #[error("not found: {message}")]
    NotFound { message: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("git {command} failed (exit {code}): {message}")]
    Failed {
        command: String,
        code: i32,
        message: String,
    },
    /// git is not installed in the sandbox's image.
    #[error("git is not installed in this sandbox (use a template with the `git` role)")]
    NotInstalled,
    #[error(transparent)]
    Kilnd(#[from] ClientError),
}

impl GitError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            GitError::NotARepository { .. } => "not_a_repository",
            GitError::AuthFailed { .. } => "auth_failed",
            GitError::NonFastForward { .. } => "non_fast_forward",
            GitError::MergeConflict { .. } => "merge_conflict",
            GitError::NothingToCommit { .. } => "nothing_to_commit",
            GitError::NotFound { .. } => "not_found",
            GitError::Invalid(_) => "invalid",
            GitError::Failed { .. } => "git_failed",
            GitError::NotInstalled => "git_not_installed",
            GitError::Kilnd(_) => "sandbox_unavailable",
        }
    }
}

type Result<T, E = GitError> = std::result::Result<T, E>;

/// Credentials for one host (or any host when `host` is `None`), given per request.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Credential {
    #[serde(default)]
    pub host: Option<String>,
    pub username: String,
    pub password: String,
    /// Kiln's id of a credential stored on the host (not part of the API); reported by
    /// [`Git::used_credentials`] once git was given it.
    #[serde(skip)]
    #[schemars(skip)]
    pub id: Option<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Whether a credential for `pattern` (`example.com` or `example.com:8443`) applies to the
/// host git asks about (`example.com`, or with a port: `example.com:8443`).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let h = host.to_ascii_lowercase();
    p == h || (!p.contains(':') && h.split(':').next() == Some(p.as_str()))
}

/// A commit author / committer identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Identity {
    pub name: String,
    pub email: String,
}

/// `git status`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Current branch; `None` when HEAD is detached.
    pub branch: Option<String>,
    /// HEAD's commit; `None` before the first commit.
    pub head: Option<String>,
    pub upstream: Option<String>,
    pub ahead: u32,
    pub behind: u32,
    pub entries: Vec<StatusEntry>,
    /// No staged, unstaged, untracked or conflicted entries.
    pub clean: bool,
}

/// One path in `git status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEntry {
    pub path: String,
    /// For renames and copies: the path it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orig_path: Option<String>,
    /// `changed`, `renamed`, `unmerged`, `untracked` or `ignored`.
    pub kind: String,
    /// Index (staged) status letter: `.` unchanged, `M`, `A`, `D`, `R`, `C`, `T`, `U`, `?`.
    pub index: char,
    /// Work tree (unstaged) status letter, same alphabet.
    pub worktree: char,
}

/// Parses `git status --porcelain=v2 --branch -z` output.
pub fn parse_status(out: &str) -> Status {
    let mut st = Status::default();
    let mut fields = out.split('\0');
    while let Some(rec) = fields.next() {
        if rec.is_empty() {
            continue;
        }
        if let Some(h) = rec.strip_prefix("# ") {
            let (k, v) = h.split_once(' ').unwrap_or((h, ""));
            match k {
                "branch.oid" if v != "(initial)" => st.head = Some(v.to_string()),
                "branch.head" if v != "(detached)" => st.branch = Some(v.to_string()),
                "branch.upstream" => st.upstream = Some(v.to_string()),
                "branch.ab" => {
                    for p in v.split_whitespace() {
                        if let Some(n) = p.strip_prefix('+') {
                            st.ahead = n.parse().unwrap_or(0);
                        } else if let Some(n) = p.strip_prefix('-') {
                            st.behind = n.parse().unwrap_or(0);
                        }
                    }
                }
                _ => {}
            }
            continue;
        }
        let xy = |s: &str| {
            let mut c = s.chars();
            (c.next().unwrap_or('.'), c.next().unwrap_or('.'))
        };
        let mut parts = rec.splitn(2, ' ');
        let tag = parts.next().unwrap_or("");
        let rest = parts.next().unwrap_or("");
        let entry = match tag {
            // 1 XY sub mH mI mW hH hI path
            "1" => {
                let f: Vec<&str> = rest.splitn(8, ' ').collect();
                (f.len() == 8).then(|| {
                    let (i, w) = xy(f[0]);
                    StatusEntry {
                        path: f[7].to_string(),
                        orig_path: None,
                        kind: "changed".into(),
                        index: i,
                        worktree: w,
                    }
                })
            }
            // 2 XY sub mH mI mW hH hI Xscore path NUL origPath
            "2" => {
                let f: Vec<&str> = rest.splitn(9, ' ').collect();
                let orig = fields.next().map(str::to_string);
                (f.len() == 9).then(|| {
                    let (i, w) = xy(f[0]);
                    StatusEntry {
                        path: f[8].to_string(),
                        orig_path: orig,
                        kind: "renamed".into(),
                        index: i,
                        worktree: w,
                    }
                })
            }
            // u XY sub m1 m2 m3 mW h1 h2 h3 path
            "u" => {
                let f: Vec<&str> = rest.splitn(10, ' ').collect();
                (f.len() == 10).then(|| {
                    let (i, w) = xy(f[0]);
                    StatusEntry {
                        path: f[9].to_string(),
                        orig_path: None,
                        kind: "unmerged".into(),
                        index: i,
                        worktree: w,
                    }
                })
            }
            "?" | "!" => Some(StatusEntry {
                path: rest.to_string(),
                orig_path: None,
                kind: if tag == "?" { "untracked" } else { "ignored" }.into(),
                index: '?',
                worktree: '?',
            }),
            _ => None,
        };
        st.entries.extend(entry);
    }
    st.clean = st.entries.iter().all(|e| e.kind == "ignored");
    st
}

/// The diff of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDiff {
    pub path: String,
    /// The path before a rename.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
    pub additions: u32,
    pub deletions: u32,
    pub binary: bool,
    /// The unified diff of this file (from its `diff --git` line).
    pub patch: String,
}

/// Splits `git diff` output into files.
pub fn parse_diff(out: &str) -> Vec<FileDiff> {
    let mut files: Vec<FileDiff> = Vec::new();
    for line in out.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("diff --git ") {
            let rest = rest.trim_end();
            // `a/X b/Y`; names without spaces are the common case, quoted ones are kept whole.
            let (a, b) = match rest.split_once(" b/") {
                Some((a, b)) => (a.trim_start_matches("a/").to_string(), b.to_string()),
                None => (rest.to_string(), rest.to_string()),
            };
            files.push(FileDiff {
                old_path: (a != b).then_some(a),
                path: b,
                additions: 0,
                deletions: 0,
                binary: false,
                patch: String::new(),
            });
        }
        let Some(f) = files.last_mut() else {
            continue;
        };
        f.patch.push_str(line);
        if line.starts_with("Binary files ") || line.starts_with("GIT binary patch") {
            f.binary = true;
        } else if line.starts_with('+') && !line.starts_with("+++ ") {
            f.additions += 1;
        } else if line.starts_with('-') && !line.starts_with("--- ") {
            f.deletions += 1;
        }
    }
    files
}

/// One commit of `git log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub sha: String,
    pub parents: Vec<String>,
    pub author: Identity,
    /// ISO 8601 author date.
    pub date: String,
    pub subject: String,
    pub body: String,
}

const LOG_FORMAT: &str = "%H%x1f%P%x1f%an%x1f%ae%x1f%aI%x1f%s%x1f%b%x1e";

fn parse_log(out: &str) -> Vec<Commit> {
    out.split('\x1e')
        .filter_map(|rec| {
            let rec = rec.trim_start_matches('\n');
            let f: Vec<&str> = rec.split('\x1f').collect();
            (f.len() == 7).then(|| Commit {
                sha: f[0].to_string(),
                parents: f[1].split_whitespace().map(str::to_string).collect(),
                author: Identity {
                    name: f[2].to_string(),
                    email: f[3].to_string(),
                },
                date: f[4].to_string(),
                subject: f[5].to_string(),
                body: f[6].trim_end().to_string(),
            })
        })
        .collect()
}

/// A local branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    pub name: String,
    pub sha: String,
    pub current: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

/// Output of one git run.
#[derive(Debug, Default)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// git in one sandbox, as one user.
#[derive(Debug, Clone)]
pub struct Git {
    client: Client,
    user: Option<String>,
    timeout_secs: f64,
    /// Ids of the credentials (with an id) handed to git so far (shared by clones).
    used: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn reject_option(what: &str, v: &str) -> Result<()> {
    if v.starts_with('-') || v.contains('\0') || v.is_empty() {
        return Err(GitError::Invalid(format!("{what} {v:?}")));
    }
    Ok(())
}

impl Git {
    /// git through `client`, as `user` (default: the sandbox's root).
    pub fn new(client: Client, user: Option<String>) -> Git {
        Git {
            client,
            user,
            timeout_secs: 600.0,
            used: Default::default(),
        }
    }

    /// The ids of the stored credentials git asked for and was given, in order.
    pub fn used_credentials(&self) -> Vec<String> {
        self.used.lock().map(|u| u.clone()).unwrap_or_default()
    }

    async fn run(&self, cwd: &str, args: &[&str], creds: Option<&[Credential]>) -> Result<Run> {
        let mut cmd = vec!["git".to_string()];
        cmd.extend(args.iter().map(|s| s.to_string()));
        let env = BTreeMap::from([
            ("LC_ALL".to_string(), "C".to_string()),
            ("GIT_TERMINAL_PROMPT".to_string(), "0".to_string()),
        ]);
        let mut p = match self
            .client
            .exec(ExecSpec {
                cmd,
                env,
                cwd: Some(cwd.to_string()),
                user: self.user.clone(),
                timeout_secs: Some(self.timeout_secs),
                credentials: creds.is_some(),
                tag: Some("git".into()),
                ..Default::default()
            })
            .await
        {
            Err(e) if e.code() == Some(kiln_protocol::kilnd::DaemonErrorCode::CommandNotFound) => {
                return Err(GitError::NotInstalled)
            }
            Err(e)
                if e.code() == Some(kiln_protocol::kilnd::DaemonErrorCode::Invalid)
                    && e.to_string().contains("working directory") =>
            {
                return Err(GitError::NotARepository {
                    path: cwd.to_string(),
                    message: e.to_string(),
                })
            }
            r => r?,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(reply) = p.next().await {
            match reply? {
                Reply::Output { stream, data, .. } => match stream {
                    StreamKind::Stdout => out.extend(data),
                    StreamKind::Stderr => err.extend(data),
                },
                Reply::CredentialRequest { id, fields } => {
                    let host = fields.get("host").cloned().unwrap_or_default();
                    let answer = creds
                        .unwrap_or_default()
                        .iter()
                        .find(|c| c.host.as_deref().is_none_or(|h| host_matches(h, &host)))
                        .map(|c| {
                            if let (Some(id), Ok(mut used)) = (&c.id, self.used.lock()) {
                                used.push(id.clone());
                            }
                            BTreeMap::from([
                                ("username".to_string(), c.username.clone()),
                                ("password".to_string(), c.password.clone()),
                            ])
                        });
                    tracing::debug!(%host, answered = answer.is_some(), "git credential request");
                    p.answer_credential(id, answer).await?;
                }
                Reply::Exited(st) => {
                    return Ok(Run {
                        code: st.exit_code.unwrap_or(128 + st.signal.unwrap_or(0)),
                        stdout: String::from_utf8_lossy(&out).into_owned(),
                        stderr: String::from_utf8_lossy(&err).into_owned(),
                    })
                }
                _ => {}
            }
        }
        Err(GitError::Kilnd(ClientError::Protocol(
            "the exec stream ended without an exit status".into(),
        )))
    }

    /// Runs git and turns a failure into a typed error.
    async fn ok(&self, cwd: &str, args: &[&str], creds: Option<&[Credential]>) -> Result<Run> {
        let r = self.run(cwd, args, creds).await?;
        if r.code == 0 {
            return Ok(r);
        }
        Err(self.classify(cwd, args, r).await)
    }

    async fn classify(&self, cwd: &str, args: &[&str], r: Run) -> GitError {
        let text = format!("{}\n{}", r.stderr, r.stdout);
        let message = r.stderr.trim().to_string();
        let message = if message.is_empty() {
            r.stdout.trim().to_string()
        } else {
            message
        };
        if text.contains("not a git repository") {
            return GitError::NotARepository {
                path: cwd.to_string(),
                message,
            };
        }
        if text.contains("Authentication failed")
            || text.contains("could not read Username")
            || text.contains("could not read Password")
            || text.contains("terminal prompts disabled")
            || text.contains("The requested URL returned error: 401")
            || text.contains("The requested URL returned error: 403")
        {
            return GitError::AuthFailed { message };
        }
        if text.contains("[rejected]")
            && (text.contains("non-fast-forward") || text.contains("fetch first"))
        {
            return GitError::NonFastForward { message };
        }
        if text.contains("CONFLICT") || text.contains("Automatic merge failed") {
            let paths = match self
                .run(cwd, &["diff", "--name-only", "--diff-filter=U"], None)
                .await
            {
                Ok(u) => u.stdout.lines().map(str::to_string).collect(),
                Err(_) => Vec::new(),
            };
            return GitError::MergeConflict { paths, message };
        }
        if text.contains("nothing to commit") || text.contains("no changes added to commit") {
            return GitError::NothingToCommit { message };
        }
        if text.contains("did not match any")
            || text.contains("unknown revision")
            || text.contains("not found")
            || text.contains("does not exist")
        {
            return GitError::NotFound { message };
        }
        GitError::Failed {
            command: args.first().copied().unwrap_or("").to_string(),
            code: r.code,
            message,
        }
    }

    /// `git clone URL DIR` (run in `cwd`); returns the clone's status.
    pub async fn clone(
        &self,
        cwd: &str,
        url: &str,
        dir: Option<&str>,
        branch: Option<&str>,
        creds: &[Credential],
    ) -> Result<Status> {
        reject_option("repository URL", url)?;
        let mut args = vec!["clone", "--quiet"];
        if let Some(b) = branch {
            reject_option("branch", b)?;
            args.extend(["--branch", b]);
        }
        args.extend(["--", url]);
        let target = match dir {
            Some(d) => d.to_string(),
            None => url
                .trim_end_matches('/')
                .rsplit(['/', ':'])
                .next()
                .unwrap_or("repo")
                .trim_end_matches(".git")
                .to_string(),
        };
        args.push(&target);
        self.ok(cwd, &args, Some(creds)).await?;
        let repo = if target.starts_with('/') {
            target.clone()
        } else {
            format!("{}/{target}", cwd.trim_end_matches('/'))
        };
        self.status(&repo).await
    }

    /// `git status`, parsed.
    pub async fn status(&self, repo: &str) -> Result<Status> {
        let r = self
            .ok(
                repo,
                &[
                    "--no-optional-locks",
                    "status",
                    "--porcelain=v2",
                    "--branch",
                    "-z",
                    "--untracked-files=all",
                ],
                None,
            )
            .await?;
        Ok(parse_status(&r.stdout))
    }

    /// Unified diffs per file: the work tree against the index, or with `staged` the index
    /// against HEAD; limited to `paths` when given.
    pub async fn diff(&self, repo: &str, staged: bool, paths: &[String]) -> Result<Vec<FileDiff>> {
        let mut args = vec!["diff", "--no-color", "--no-ext-diff", "-M"];
        if staged {
            args.push("--cached");
        }
        args.push("--");
        args.extend(paths.iter().map(String::as_str));
        let r = self.ok(repo, &args, None).await?;
        Ok(parse_diff(&r.stdout))
    }

    /// `git add` of `paths` (all changes, including removals, when empty).
    pub async fn add(&self, repo: &str, paths: &[String]) -> Result<Status> {
        let mut args = vec!["add"];
        if paths.is_empty() {
            args.push("-A");
        } else {
            args.push("--");
            args.extend(paths.iter().map(String::as_str));
        }
        self.ok(repo, &args, None).await?;
        self.status(repo).await
    }

    /// Commits what is staged (with `all`, every tracked change too); returns the commit.
    pub async fn commit(
        &self,
        repo: &str,
        message: &str,
        author: &Identity,
        all: bool,
    ) -> Result<Commit> {
        if message.trim().is_empty() {
            return Err(GitError::Invalid("an empty commit message".into()));
        }
        let name = format!("user.name={}", author.name);
        let email = format!("user.email={}", author.email);
        let mut args = vec![
            "-c", &name, "-c", &email, "commit", "--quiet", "-m", message,
        ];
        if all {
            args.push("--all");
        }
        self.ok(repo, &args, None).await?;
        let mut log = self.log(repo, 1, None).await?;
        log.pop().ok_or_else(|| GitError::NotFound {
            message: "the new commit is not in the log".into(),
        })
    }

    /// The last `n` commits of `rev` (default HEAD).
    pub async fn log(&self, repo: &str, n: u32, rev: Option<&str>) -> Result<Vec<Commit>> {
        let count = format!("--max-count={}", n.clamp(1, 10_000));
        let format = format!("--format={LOG_FORMAT}");
        let mut args = vec!["log", &count, &format];
        if let Some(r) = rev {
            reject_option("revision", r)?;
            args.push(r);
        }
        args.push("--");
        let r = self.ok(repo, &args, None).await;
        match r {
            Ok(r) => Ok(parse_log(&r.stdout)),
            // A repository without commits has an empty log.
            Err(GitError::Failed { message, .. })
                if message.contains("does not have any commits yet") =>
            {
                Ok(Vec::new())
            }
            Err(GitError::NotFound { message })
                if message.contains("does not have any commits yet") =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// Local branches.
    pub async fn branches(&self, repo: &str) -> Result<Vec<Branch>> {
        let r = self
            .ok(
                repo,
                &[
                    "for-each-ref",
                    "--format=%(refname:short)%1f%(objectname)%1f%(HEAD)%1f%(upstream:short)",
                    "refs/heads",
                ],
                None,
            )
            .await?;
        Ok(r.stdout
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\x1f').collect();
                (f.len() == 4).then(|| Branch {
                    name: f[0].to_string(),
                    sha: f[1].to_string(),
                    current: f[2] == "*",
                    upstream: (!f[3].is_empty()).then(|| f[3].to_string()),
                })
            })
            .collect())
    }

    /// Creates branch `name` at `start` (default HEAD).
    pub async fn create_branch(&self, repo: &str, name: &str, start: Option<&str>) -> Result<()> {
        reject_option("branch", name)?;
        let mut args = vec!["branch", "--", name];
        if let Some(s) = start {
            reject_option("start point", s)?;
            args.push(s);
        }
        self.ok(repo, &args, None).await.map(|_| ())
    }

    /// Switches to branch `name` (creating it first with `create`).
    pub async fn checkout(&self, repo: &str, name: &str, create: bool) -> Result<Status> {
        reject_option("branch", name)?;
        let args: Vec<&str> = if create {
            vec!["switch", "--create", name]
        } else {
            vec!["switch", name]
        };
        self.ok(repo, &args, None).await?;
        self.status(repo).await
    }

    /// `git push REMOTE [BRANCH]` (with `set_upstream`, `-u`).
    pub async fn push(
        &self,
        repo: &str,
        remote: &str,
        branch: Option<&str>,
        set_upstream: bool,
        creds: &[Credential],
    ) -> Result<Status> {
        reject_option("remote", remote)?;
        let mut args = vec!["push", "--porcelain"];
        if set_upstream {
            args.push("--set-upstream");
        }
        args.push(remote);
        if let Some(b) = branch {
            reject_option("branch", b)?;
            args.push(b);
        }
        self.ok(repo, &args, Some(creds)).await?;
        self.status(repo).await
    }

    /// `git pull --no-rebase REMOTE [BRANCH]`; a conflict is [`GitError::MergeConflict`].
    pub async fn pull(
        &self,
        repo: &str,
        remote: &str,
        branch: Option<&str>,
        author: &Identity,
        creds: &[Credential],
    ) -> Result<Status> {
        reject_option("remote", remote)?;
        let name = format!("user.name={}", author.name);
        let email = format!("user.email={}", author.email);
        let mut args = vec![
            "-c",
            &name,
            "-c",
            &email,
            "pull",
            "--no-rebase",
            "--no-edit",
            remote,
        ];
        if let Some(b) = branch {
            reject_option("branch", b)?;
            args.push(b);
        }
        self.ok(repo, &args, Some(creds)).await?;
        self.status(repo).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let out = "# branch.oid 1111111111111111111111111111111111111111\0# branch.head main\0\
                   # branch.upstream origin/main\0# branch.ab +2 -1\0\
                   1 .M N... 100644 100644 100644 aaaa bbbb src/lib.rs\0\
                   1 A. N... 000000 100644 100644 0000 cccc new file.txt\0\
                   2 R. N... 100644 100644 100644 dddd dddd R100 renamed.rs\0old.rs\0\
                   u UU N... 100644 100644 100644 100644 e1 e2 e3 conflict.txt\0\
                   ? untracked.md\0";
        let st = parse_status(out);
        expect_test::expect![[r#"
            Status {
                branch: Some(
                    "main",
                ),
                head: Some(
                    "1111111111111111111111111111111111111111",
                ),
                upstream: Some(
                    "origin/main",
                ),
                ahead: 2,
                behind: 1,
                entries: [
                    StatusEntry {
                        path: "src/lib.rs",
                        orig_path: None,
                        kind: "changed",
                        index: '.',
                        worktree: 'M',
                    },
                    StatusEntry {
                        path: "new file.txt",
                        orig_path: None,
                        kind: "changed",
                        index: 'A',
                        worktree: '.',
                    },
                    StatusEntry {
                        path: "renamed.rs",
                        orig_path: Some(
                            "old.rs",
                        ),
                        kind: "renamed",
                        index: 'R',
                        worktree: '.',
                    },
                    StatusEntry {
                        path: "conflict.txt",
                        orig_path: None,
                        kind: "unmerged",
                        index: 'U',
                        worktree: 'U',
                    },
                    StatusEntry {
                        path: "untracked.md",
                        orig_path: None,
                        kind: "untracked",
                        index: '?',
                        worktree: '?',
                    },
                ],
                clean: false,
            }
        "#]]
        .assert_debug_eq(&st);
        let fresh = parse_status("# branch.oid (initial)\0# branch.head main\0");
        assert_eq!(fresh.head, None);
        assert!(fresh.clean);
        let detached = parse_status("# branch.oid abc\0# branch.head (detached)\0");
        assert_eq!(detached.branch, None);
    }

    #[test]
    fn diff_parsing() {
        let out = "diff --git a/a.txt b/a.txt\nindex 1..2 100644\n--- a/a.txt\n+++ b/a.txt\n\
                   @@ -1,2 +1,2 @@\n-old\n+new\n+more\n ctx\n\
                   diff --git a/img.png b/img.png\nBinary files a/img.png and b/img.png differ\n\
                   diff --git a/old.rs b/new.rs\nsimilarity index 100%\nrename from old.rs\nrename to new.rs\n";
        let files = parse_diff(out);
        assert_eq!(files.len(), 3);
        assert_eq!(
            (
                files[0].path.as_str(),
                files[0].additions,
                files[0].deletions
            ),
            ("a.txt", 2, 1)
        );
        assert!(files[0].patch.starts_with("diff --git a/a.txt"));
        assert!(files[0].patch.ends_with(" ctx\n"));
        assert!(files[1].binary);
        assert_eq!(files[2].old_path.as_deref(), Some("old.rs"));
        assert_eq!(files[2].path, "new.rs");
        assert!(parse_diff("").is_empty());
    }

    #[test]
    fn log_parsing() {
        let out = "aaa\x1fppp qqq\x1fAda\x1fada@example.com\x1f2026-11-24T07:00:00+00:00\x1fMerge\x1fbody line\n\x1e\n\
                   bbb\x1f\x1fBob\x1fbob@example.com\x1f2026-11-23T07:00:00+00:00\x1fFirst\x1f\x1e\n";
        let log = parse_log(out);
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].parents, vec!["ppp", "qqq"]);
        assert_eq!(log[0].body, "body line");
        assert_eq!(log[1].parents, Vec::<String>::new());
        assert_eq!(log[1].author.name, "Bob");
    }

    #[test]
    fn credential_hosts() {
        assert!(host_matches("github.com", "github.com"));
        assert!(host_matches("GitHub.com", "github.com:443"));
        assert!(host_matches("git.local:8443", "git.local:8443"));
        assert!(!host_matches("git.local:8443", "git.local:9000"));
        assert!(!host_matches("git.local:8443", "git.local"));
        assert!(!host_matches("github.com", "evilgithub.com"));
    }

    #[test]
    fn credentials_are_redacted_in_debug_output() {
        let c = Credential {
            host: Some("h".into()),
            username: "u".into(),
            password: "hunter2".into(),
            id: None,
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
