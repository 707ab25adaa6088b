//! Git URL sources. The URL is checked before anything runs ([`check_url`]): never an option,
//! never a `transport::address` (`ext::` runs a program), no password (it would be stored),
//! and for untrusted callers no local path, `file://` or SSH (the server's identity) and no
//! private or loopback address. Kiln fetches the one branch or tag, shallow (`--depth 1`), into
//! a bare repository in the index's own directory, with the user's and system's git config
//! ignored, only the URL's own protocol allowed and no redirects; a sync fetches again (only
//! the missing objects travel) and reads the commit through [`GitTree`]: `ls-tree` gives every
//! file's blob id, so unchanged files are skipped without reading them, and changed ones are
//! read through one `cat-file --batch` process.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::source::{Entry, EntryKind, Tree};
use crate::Error;

/// What a caller may fetch from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GitPolicy {
    /// Local paths, `file://` and SSH (which would use the server's own keys).
    pub allow_local: bool,
    /// Loopback, private, link-local and other non-public addresses.
    pub allow_private_hosts: bool,
}

impl GitPolicy {
    /// The operator (the system organisation, a library user).
    pub const TRUSTED: GitPolicy = GitPolicy {
        allow_local: true,
        allow_private_hosts: true,
    };
    /// A tenant.
    pub const TENANT: GitPolicy = GitPolicy {
        allow_local: false,
        allow_private_hosts: false,
    };
}

/// The protocol a URL is fetched with (the only one git is allowed to use for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Https,
    Http,
    Git,
    Ssh,
    File,
}

impl Protocol {
    fn allow_list(self) -> &'static str {
        match self {
            Protocol::Https => "https",
            Protocol::Http => "http",
            Protocol::Git => "git",
            Protocol::Ssh => "ssh",
            Protocol::File => "file",
        }
    }
}

fn invalid(url: &str, why: &str) -> Error {
    Error::Invalid(format!("git URL `{}` {why}", shown(url)))
}

/// The URL as it may be shown: a password, should one slip through, is masked.
pub fn shown(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let auth_end = rest.find('/').unwrap_or(rest.len());
    match rest[..auth_end].rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}{}", &rest[auth_end..])
        }
        _ => url.to_string(),
    }
}

/// Whether an address is not on the public internet.
fn private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return private_ip(IpAddr::V4(v4));
            }
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Checks a git URL against `policy`; returns the protocol it is fetched with.
pub fn check_url(url: &str, policy: GitPolicy) -> Result<Protocol, Error> {
    if url.is_empty() || url.len() > 2048 {
        return Err(Error::Invalid(
            "the git URL must be 1-2048 characters".into(),
        ));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(url, "contains spaces or control characters"));
    }
    if url.starts_with('-') {
        return Err(invalid(url, "looks like a command-line option"));
    }
    // git's `<transport>::<address>` form (`ext::`, `fd::`, any remote helper).
    if url.find("::").is_some_and(|i| {
        i > 0
            && url[..i]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    }) {
        return Err(invalid(
            url,
            "uses the `transport::address` form (ext:: and fd:: run programs on the server)",
        ));
    }
    let forbidden = |why: &str| Error::Forbidden(format!("git URL `{}` {why}", shown(url)));
    let Some((scheme, rest)) = url.split_once("://") else {
        // `user@host:path` is SSH; anything else is a path on the server.
        let colon = url.find(':');
        let slash = url.find('/');
        let scp = colon.is_some_and(|c| slash.is_none_or(|s| c < s));
        if !policy.allow_local {
            return Err(forbidden(if scp {
                "is an SSH address (it would use the server's own SSH identity)"
            } else {
                "is a path on the server"
            }));
        }
        return Ok(if scp { Protocol::Ssh } else { Protocol::File });
    };
    let protocol = match scheme.to_ascii_lowercase().as_str() {
        "https" => Protocol::Https,
        "http" => Protocol::Http,
        "git" => Protocol::Git,
        "ssh" | "git+ssh" | "ssh+git" => Protocol::Ssh,
        "file" => Protocol::File,
        other => {
            return Err(invalid(
                url,
                &format!("has scheme `{other}`; use https://, http:// or git://"),
            ))
        }
    };
    match protocol {
        Protocol::File if !policy.allow_local => {
            return Err(forbidden("is a path on the server (file://)"))
        }
        Protocol::Ssh if !policy.allow_local => {
            return Err(forbidden(
                "uses SSH, which would use the server's own SSH identity",
            ))
        }
        Protocol::File => return Ok(protocol),
        _ => {}
    }
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if userinfo.is_some_and(|u| u.contains(':')) {
        return Err(invalid(
            url,
            "carries a password; credentials in git URLs are not supported (the URL is stored in the index's configuration)",
        ));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid(url, "has an unterminated IPv6 address"))?;
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(url, "has no host"));
    }
    let port: u16 = match port {
        None | Some("") => match protocol {
            Protocol::Https => 443,
            Protocol::Http => 80,
            Protocol::Git => 9418,
            _ => 22,
        },
        Some(p) => p
            .parse()
            .map_err(|_| invalid(url, &format!("has an invalid port `{p}`")))?,
    };
    if !policy.allow_private_hosts {
        let lower = host.to_ascii_lowercase();
        let literal = host.parse::<IpAddr>().ok();
        // `127.1`, `2130706433`, `0x7f.0.0.1`: address notations curl accepts but that are not
        // plain dotted quads.
        let odd_numeric = literal.is_none()
            && (lower.bytes().all(|b| b.is_ascii_digit() || b == b'.') || lower.starts_with("0x"));
        let private = odd_numeric
            || lower == "localhost"
            || lower.ends_with(".localhost")
            || literal.is_some_and(private_ip)
            || (host, port)
                .to_socket_addrs()
                .map(|mut a| a.any(|a| private_ip(a.ip())))
                .unwrap_or(false);
        if private {
            return Err(forbidden(
                "points at a loopback, private or link-local address",
            ));
        }
    }
    Ok(protocol)
}

/// Checks a branch or tag name (it ends up in a refspec).
pub fn check_ref(r: &str) -> Result<(), Error> {
    let bad = r.is_empty()
        || r.len() > 255
        || r.starts_with('-')
        || r.starts_with('/')
        || r.ends_with('/')
        || r.ends_with('.')
        || r.ends_with(".lock")
        || r.contains("..")
        || r.contains("//")
        || r.contains("@{")
        || r.bytes()
            .any(|b| b.is_ascii_control() || b" ~^:?*[\\".contains(&b));
    if bad {
        return Err(Error::Invalid(format!(
            "`{r}` is not a branch or tag name git accepts"
        )));
    }
    Ok(())
}

/// How long one git command may run.
const GIT_TIMEOUT: Duration = Duration::from_secs(600);

/// [`git`] run in repository `dir`.
fn git_in_repo(protocol: Protocol, dir: &Path) -> Command {
    let mut c = git(protocol);
    c.arg("-C").arg(dir);
    c
}

/// A git command with the server's and user's configuration ignored, no prompts, no hooks and
/// only `protocol` allowed.
fn git(protocol: Protocol) -> Command {
    let mut c = Command::new("git");
    c.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", "/nonexistent")
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", protocol.allow_list())
        .env(
            "GIT_SSH_COMMAND",
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
        )
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "http.followRedirects=false",
            "-c",
            "gc.auto=0",
            "-c",
            "advice.detachedHead=false",
        ])
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` to completion (killed after the timeout); stdout on success, the tail of stderr
/// as the error.
fn run(mut cmd: Command, what: &str) -> Result<Vec<u8>, Error> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Source(format!("cannot run git ({e}); is git installed?")))?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut b);
        }
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let deadline = Instant::now() + GIT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Source(format!(
                "{what}: git did not finish within {} s",
                GIT_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if status.success() {
        return Ok(stdout);
    }
    let text = String::from_utf8_lossy(&stderr);
    let tail: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("hint:"))
        .collect();
    let mut msg = tail[tail.len().saturating_sub(2)..].join("; ");
    if msg.len() > 400 {
        let cut = (0..=400)
            .rev()
            .find(|i| msg.is_char_boundary(*i))
            .unwrap_or(0);
        msg.truncate(cut);
    }
    Err(Error::Source(format!("{what}: {}", shown(&msg))))
}

/// A git source's bare repository in the index's directory.
pub struct Repo {
    dir: PathBuf,
    url: String,
    git_ref: Option<String>,
    protocol: Protocol,
}

/// The local ref the fetched commit is kept under.
const HEAD_REF: &str = "refs/kiln/head";

impl Repo {
    /// The repository of `url` at `dir` (nothing runs yet). The URL was checked at create.
    pub fn new(dir: &Path, url: &str, git_ref: Option<&str>) -> Result<Repo, Error> {
        let protocol = check_url(url, GitPolicy::TRUSTED)?;
        if let Some(r) = git_ref {
            check_ref(r)?;
        }
        Ok(Repo {
            dir: dir.to_path_buf(),
            url: url.to_string(),
            git_ref: git_ref.map(str::to_string),
            protocol,
        })
    }

    fn remote_ref(&self) -> &str {
        self.git_ref.as_deref().unwrap_or("HEAD")
    }

    /// Asks the remote for the ref (nothing is stored): a wrong URL or a missing branch is
    /// reported when the index is created, not at its first sync.
    pub fn probe(&self) -> Result<(), Error> {
        let mut c = git(self.protocol);
        c.args([
            "ls-remote",
            "--end-of-options",
            &self.url,
            self.remote_ref(),
        ]);
        let out = run(c, &format!("reaching {}", shown(&self.url)))?;
        if out.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::Invalid(format!(
                "`{}` has no branch or tag `{}`",
                shown(&self.url),
                self.remote_ref()
            )));
        }
        Ok(())
    }

    /// Fetches the ref (shallow) and returns its commit id.
    pub fn fetch(&self) -> Result<String, Error> {
        if !self.dir.join("HEAD").exists() {
            std::fs::create_dir_all(&self.dir)?;
            let mut c = git(self.protocol);
            c.args(["init", "--quiet", "--bare", "--template="])
                .arg(&self.dir);
            run(c, "creating the clone")?;
        }
        let mut c = git_in_repo(self.protocol, &self.dir);
        c.args([
            "fetch",
            "--quiet",
            "--depth=1",
            "--no-tags",
            "--no-write-fetch-head",
            "--end-of-options",
            &self.url,
            &format!("+{}:{HEAD_REF}", self.remote_ref()),
        ]);
        run(c, &format!("fetching {}", shown(&self.url)))?;
        let mut c = git_in_repo(self.protocol, &self.dir);
        c.args(["rev-parse", "--verify", &format!("{HEAD_REF}^{{commit}}")]);
        let commit = String::from_utf8_lossy(&run(c, "reading the fetched commit")?)
            .trim()
            .to_string();
        // Objects of earlier commits are dropped once there are enough of them.
        let mut c = git_in_repo(self.protocol, &self.dir);
        c.args([
            "-c",
            "gc.auto=6700",
            "gc",
            "--auto",
            "--quiet",
            "--prune=now",
        ]);
        run(c, "compacting the clone")?;
        Ok(commit)
    }

    /// The files of `commit`.
    pub fn tree(&self, commit: &str) -> Result<GitTree, Error> {
        let mut c = git_in_repo(self.protocol, &self.dir);
        c.args(["ls-tree", "-r", "-l", "-z", "--full-tree", commit]);
        let out = run(c, "listing the commit")?;
        let mut dirs: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        let mut blobs = BTreeMap::new();
        dirs.insert(String::new(), Vec::new());
        for rec in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let rec = String::from_utf8_lossy(rec);
            let Some((meta, path)) = rec.split_once('\t') else {
                continue;
            };
            let mut f = meta.split_whitespace();
            let (Some(mode), Some(_kind), Some(id), Some(size)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let (parent, name) = match path.rsplit_once('/') {
                Some((p, n)) => (p.to_string(), n.to_string()),
                None => (String::new(), path.to_string()),
            };
            // Every ancestor directory is listed in its parent.
            let mut at = parent.clone();
            while !dirs.contains_key(&at) {
                dirs.insert(at.clone(), Vec::new());
                let (up, n) = match at.rsplit_once('/') {
                    Some((u, n)) => (u.to_string(), n.to_string()),
                    None => (String::new(), at.clone()),
                };
                dirs.entry(up.clone()).or_default().push(Entry {
                    name: n,
                    kind: EntryKind::Dir,
                    size: 0,
                    stamp: 0,
                });
                at = up;
            }
            // Regular files only: symlinks (120000) and submodules (160000) are not indexed.
            let kind = if mode == "100644" || mode == "100755" {
                EntryKind::File
            } else {
                EntryKind::Other
            };
            let stamp = i64::from_str_radix(id.get(..15).unwrap_or("0"), 16).unwrap_or(0);
            dirs.entry(parent).or_default().push(Entry {
                name,
                kind,
                size: size.parse().unwrap_or(0),
                stamp,
            });
            if kind == EntryKind::File {
                blobs.insert(path.to_string(), id.to_string());
            }
        }
        Ok(GitTree {
            describe: format!("{}@{}", shown(&self.url), &commit[..commit.len().min(12)]),
            dir: self.dir.clone(),
            protocol: self.protocol,
            dirs,
            blobs,
            cat: Mutex::new(None),
        })
    }
}

struct CatFile {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for CatFile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The files of one fetched commit.
pub struct GitTree {
    describe: String,
    dir: PathBuf,
    protocol: Protocol,
    dirs: BTreeMap<String, Vec<Entry>>,
    blobs: BTreeMap<String, String>,
    cat: Mutex<Option<CatFile>>,
}

impl GitTree {
    fn cat_file(&self) -> io::Result<CatFile> {
        let mut c = git_in_repo(self.protocol, &self.dir);
        c.args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(io::Error::other("git cat-file without pipes"));
        };
        Ok(CatFile {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }
}

impl Tree for GitTree {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn list(&self, dir: &str) -> io::Result<Vec<Entry>> {
        self.dirs.get(dir).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{dir}: no such directory"))
        })
    }

    fn read(&self, rel: &str) -> io::Result<Vec<u8>> {
        let id = self.blobs.get(rel).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{rel}: no such file"))
        })?;
        let mut guard = self.cat.lock();
        if guard.is_none() {
            *guard = Some(self.cat_file()?);
        }
        let Some(cat) = guard.as_mut() else {
            return Err(io::Error::other("git cat-file is not running"));
        };
        let result = (|| {
            writeln!(cat.stdin, "{id}")?;
            cat.stdin.flush()?;
            let mut header = String::new();
            cat.stdout.read_line(&mut header)?;
            let mut f = header.split_whitespace();
            let (Some(_), Some("blob"), Some(size)) = (f.next(), f.next(), f.next()) else {
                return Err(io::Error::other(format!(
                    "{rel}: git cat-file answered `{}`",
                    header.trim()
                )));
            };
            let size: usize = size
                .parse()
                .map_err(|_| io::Error::other("git cat-file: bad size"))?;
            let mut buf = vec![0u8; size + 1];
            cat.stdout.read_exact(&mut buf)?;
            buf.pop();
            Ok(buf)
        })();
        if result.is_err() {
            // The conversation is out of step: start a fresh process next time.
            *guard = None;
        }
        result
    }
}

/// A real git server for tests: `git daemon --inetd` per connection on a loopback port,
/// serving the repositories under a directory (no stand-in: the real git protocol).
pub mod testing {
    use std::net::TcpListener;
    use std::os::fd::OwnedFd;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Serves `base` at `git://127.0.0.1:PORT/` until dropped.
    pub struct GitDaemon {
        pub url: String,
        pub base: PathBuf,
        stop: Arc<AtomicBool>,
        addr: std::net::SocketAddr,
    }

    impl GitDaemon {
        pub fn start(base: &Path) -> std::io::Result<GitDaemon> {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let addr = l.local_addr()?;
            let stop = Arc::new(AtomicBool::new(false));
            let (s2, b2) = (stop.clone(), base.to_path_buf());
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    if s2.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let Ok(out) = conn.try_clone() else { continue };
                    let child = Command::new("git")
                        .arg("daemon")
                        .arg("--inetd")
                        .arg("--export-all")
                        .arg("--log-destination=none")
                        .arg(format!("--base-path={}", b2.display()))
                        .arg(&b2)
                        .env("GIT_CONFIG_GLOBAL", "/dev/null")
                        .env("GIT_CONFIG_NOSYSTEM", "1")
                        .stdin(Stdio::from(OwnedFd::from(conn)))
                        .stdout(Stdio::from(OwnedFd::from(out)))
                        .stderr(Stdio::null())
                        .spawn();
                    if let Ok(mut c) = child {
                        std::thread::spawn(move || {
                            let _ = c.wait();
                        });
                    }
                }
            });
            Ok(GitDaemon {
                url: format!("git://{addr}"),
                base: base.to_path_buf(),
                stop,
                addr,
            })
        }
    }

    impl Drop for GitDaemon {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so it sees the flag.
            let _ = std::net::TcpStream::connect(self.addr);
        }
    }

    /// Runs git in `dir` with a fixed identity; panics with git's stderr on failure.
    pub fn git_in(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=Kiln Test",
                "-c",
                "user.email=test@kiln.invalid",
                "-c",
                "init.defaultBranch=main",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
