//! Messages between the host and `kilnd`, the daemon that runs as PID 1 inside every sandbox.
//!
//! # Transport
//! Any reliable byte stream (a Unix socket bind-mounted out of the sandbox today; TCP or vsock
//! for remote backends later). The stream carries *frames*:
//!
//! ```text
//! +----------------+---------+-----------------------+
//! | len: u32 (BE)  | kind:u8 | payload (len-1 bytes) |
//! +----------------+---------+-----------------------+
//! ```
//!
//! `len` counts the kind byte plus the payload and is at most [`MAX_FRAME`].
//! Kinds are [`FRAME_JSON`] (payload is one JSON [`Request`], [`Control`] or [`Reply`]),
//! [`FRAME_DATA`] (raw bytes of a file or PTY stream) and [`FRAME_END`] (end of a data stream,
//! empty payload).
//!
//! # Conversation
//! One connection carries one operation. The client writes one [`Request`] frame; what follows
//! depends on the operation and is documented on each variant. Every operation ends with a
//! terminal reply ([`Reply::Ok`], [`Reply::Error`], [`Reply::Exited`] ...) after which the
//! daemon closes the connection, except streams the client ends by closing its side
//! (`Attach`, `Watch`, PTY). Dropping a connection never kills a process: processes and PTY
//! sessions live in the daemon until they exit and can be re-attached by id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest frame either side accepts (kind byte + payload).
pub const MAX_FRAME: u32 = 4 * 1024 * 1024;
/// Frame kind: a JSON message.
pub const FRAME_JSON: u8 = 0;
/// Frame kind: raw data bytes.
pub const FRAME_DATA: u8 = 1;
/// Frame kind: end of a data stream.
pub const FRAME_END: u8 = 2;

/// Where kilnd listens inside the sandbox (the directory is bind-mounted from the host).
pub const SOCKET_DIR_IN_SANDBOX: &str = "/.kiln/run";
/// File name of kilnd's socket inside [`SOCKET_DIR_IN_SANDBOX`].
pub const SOCKET_NAME: &str = "kilnd.sock";
/// Where the kilnd binary is bind-mounted (read-only) inside the sandbox.
pub const KILND_PATH_IN_SANDBOX: &str = "/.kiln/kilnd";

/// A request from the host. Serialized with an `op` tag, e.g. `{"op":"stat","path":"/etc"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check. Reply: `Ok` with [`OkBody::Pong`].
    Ping,
    /// Start a process. Replies: `Started`, then (unless `spec.detach`) `Output`* and `Exited`.
    /// With `spec.stdin = true` the client may send `Data` frames (stdin bytes) and an `End`
    /// frame (close stdin) on the same connection.
    Exec { spec: ExecSpec },
    /// Follow a process by id: replays buffered output with `seq > after_seq`
    /// (a `Gap` reply first if some of it was dropped from the ring buffer), then live output,
    /// then `Exited`. Attaching to an exited process replays and ends with `Exited` at once.
    Attach { pid: String, after_seq: u64 },
    /// Write to a process's stdin: the client sends `Data` frames then `End`.
    /// `close` = also close the process's stdin after the data. Reply: `Ok`.
    Stdin { pid: String, close: bool },
    /// Send a signal (number, e.g. 15) to a process (its whole process group). Reply: `Ok`.
    Signal { pid: String, signal: i32 },
    /// List processes started through kilnd (running and recently exited). Reply: `Ok` with `Processes`.
    ListProcesses,
    /// Open a PTY session. Replies: `PtyOpened`, then the output as `Data` frames and finally
    /// `Exited`. The client sends input as `Data` frames and [`Control`] JSON frames (resize).
    /// Closing the connection detaches; the session keeps running.
    PtyOpen { spec: PtySpec },
    /// Re-attach a PTY session: replays the buffered screen output then continues as `PtyOpen`.
    PtyAttach { id: String },
    /// Stream a file: `Ok` with `Stat` (the file's metadata), then `Data` frames, then `End`.
    ReadFile { path: String },
    /// Write a file atomically (temp file + rename): the client sends `Data` frames then `End`.
    /// Reply: `Ok` with `Stat` of the new file. On error nothing is left behind.
    WriteFile {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parent directories.
        #[serde(default)]
        parents: bool,
    },
    /// List a directory. Reply: `Ok` with `Entries`.
    ListDir {
        path: String,
        /// 1 = the directory itself only; larger walks deeper.
        #[serde(default = "one")]
        depth: u32,
    },
    /// Reply: `Ok` with `Stat`.
    Stat { path: String },
    /// `mkdir` (with `parents`: `mkdir -p`). Reply: `Ok` with `Stat`.
    Mkdir {
        path: String,
        #[serde(default)]
        parents: bool,
    },
    /// Rename/move. Reply: `Ok` with `Stat` of the destination.
    Move {
        from: String,
        to: String,
        #[serde(default)]
        overwrite: bool,
    },
    /// Remove a file, or a directory (with `recursive` for non-empty ones). Reply: `Ok`.
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Stream changes under a path: `Ok` once the watch is armed, then `Watch` replies until
    /// the client closes the connection.
    Watch {
        path: String,
        #[serde(default = "yes")]
        recursive: bool,
    },
    /// The TCP ports something listens on inside the sandbox. Reply: `Ok` with `Ports`.
    ListPorts,
    /// Follow the listening ports: `Ok` with `Ports` at once, then a `Ports` reply each time
    /// the set changes (checked every `interval_ms`, 100..=10000), until the client closes.
    WatchPorts {
        #[serde(default = "default_port_interval")]
        interval_ms: u32,
    },
    /// Open a TCP connection to `port` on `host` (default `127.0.0.1`) inside the sandbox.
    /// Reply: `Ok`; after it the connection is a raw byte pipe to that TCP connection in both
    /// directions (no more frames; a half-close is passed on).
    Connect {
        port: u16,
        #[serde(default)]
        host: Option<String>,
    },
    /// Start a process whose stdin and stdout are this connection (a language server, say):
    /// reply `Ok`, then raw bytes both ways; stderr is discarded. Closing the connection
    /// kills the process (its whole group); the process exiting closes the connection.
    /// `spec.stdin`, `detach`, `timeout_secs` and `credentials` do not apply.
    Pipe { spec: ExecSpec },
}

fn default_port_interval() -> u32 {
    500
}

/// A listening TCP socket inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ListenPort {
    pub port: u16,
    /// Bound address (`0.0.0.0`, `127.0.0.1`, `::` ...).
    pub address: String,
    /// The process holding the socket, when kilnd can see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// That process's command name (`comm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// How to start a process.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecSpec {
    /// argv; `cmd[0]` is looked up in `PATH` when it has no slash.
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); default `/`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid[:gid] from the sandbox's `/etc/passwd`; default root.
    #[serde(default)]
    pub user: Option<String>,
    /// Kill the process group (SIGKILL) after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Keep stdin open for `Data` frames / `Stdin` requests (otherwise stdin is /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Reply `Started` and end the conversation; the process runs on (re-attach with `Attach`).
    #[serde(default)]
    pub detach: bool,
    /// Free-form label shown in `ListProcesses`.
    #[serde(default)]
    pub tag: Option<String>,
    /// Relay git credential requests of this process to the client (`CredentialRequest`
    /// replies, answered with a `Credential` control frame); needs an attached client.
    #[serde(default)]
    pub credentials: bool,
}

/// How to open a PTY session.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PtySpec {
    /// argv; empty = the user's login shell (falls back to `/bin/sh`).
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    pub cols: u16,
    pub rows: u16,
}

/// Client -> daemon control messages sent as JSON frames during a PTY conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "control", rename_all = "snake_case")]
pub enum Control {
    Resize {
        cols: u16,
        rows: u16,
    },
    /// Send a signal to the session's process group.
    Signal {
        signal: i32,
    },
    /// The answer to a `CredentialRequest` (git credential attributes such as `username` and
    /// `password`); `None` declines.
    Credential {
        id: u64,
        fields: Option<BTreeMap<String, String>>,
    },
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    Stdout,
    Stderr,
}

/// Daemon -> host messages. Serialized with a `reply` tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<OkBody>,
    },
    Error(DaemonError),
    /// A process was started; `pid` is kilnd's id for it (stable across re-attach),
    /// `os_pid` the Linux pid inside the sandbox.
    Started {
        pid: String,
        os_pid: u32,
    },
    /// One chunk of output. `seq` numbers all chunks of a process in one total order
    /// (stdout and stderr interleaved as kilnd read them), starting at 1.
    Output {
        seq: u64,
        stream: StreamKind,
        #[serde(with = "crate::b64")]
        #[cfg_attr(feature = "schema", schemars(with = "String"))]
        data: Vec<u8>,
    },
    /// Output with `seq` in `[from, to]` was dropped from the bounded ring buffer before this
    /// client attached.
    Gap {
        from: u64,
        to: u64,
    },
    /// The process ended. `exit_code` is set when it exited, `signal` when it was killed.
    Exited(ExitStatus),
    /// A PTY session is open.
    PtyOpened {
        id: String,
        os_pid: u32,
    },
    /// A change under a watched path.
    Watch(WatchEvent),
    /// A process started with `credentials` asks for git credentials (the attributes git
    /// passed to its helper: `protocol`, `host`, `path`, `username`...).
    CredentialRequest {
        id: u64,
        fields: BTreeMap<String, String>,
    },
    /// The listening ports now (a `WatchPorts` update).
    Ports {
        ports: Vec<ListenPort>,
    },
}

/// Payloads of [`Reply::Ok`]. Tagged with `type` (not `kind`: [`FileStat`] has a `kind`
/// field, and `Stat` is flattened into the tagged object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OkBody {
    Pong { version: String },
    Stat(FileStat),
    Entries { entries: Vec<FileStat> },
    Processes { processes: Vec<ProcessInfo> },
    Ports { ports: Vec<ListenPort> },
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExitStatus {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Killed by kilnd because `timeout_secs` passed.
    #[serde(default)]
    pub timed_out: bool,
    /// Highest output `seq` of the process (0 if it printed nothing).
    #[serde(default)]
    pub last_seq: u64,
}

/// A process kilnd started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProcessInfo {
    pub pid: String,
    pub os_pid: u32,
    pub cmd: Vec<String>,
    #[serde(default)]
    pub tag: Option<String>,
    pub running: bool,
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// Unix milliseconds.
    pub started_at_ms: u64,
}

/// File type as reported by stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Metadata of a file inside the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FileStat {
    /// Absolute, normalised path inside the sandbox.
    pub path: String,
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Unix milliseconds.
    pub modified_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// What happened to a watched path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum WatchKind {
    Create,
    Modify,
    Remove,
    Rename,
    /// Events were lost (kernel queue overflow); the client should rescan.
    Overflow,
}

/// One change under a watched path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WatchEvent {
    pub kind: WatchKind,
    /// Absolute path inside the sandbox.
    pub path: String,
    pub is_dir: bool,
}

/// Error codes kilnd reports; the server maps them to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum DaemonErrorCode {
    /// Bad request (malformed, invalid argument, path escaping the root ...).
    Invalid,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    /// Not a directory / is a directory / directory not empty.
    WrongKind,
    /// The command to execute does not exist or is not executable.
    CommandNotFound,
    NoSpace,
    Internal,
}

/// An error from kilnd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DaemonError {
    pub code: DaemonErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape_is_stable() {
        let r = Request::Exec {
            spec: ExecSpec {
                cmd: vec!["true".into()],
                ..Default::default()
            },
        };
        let s = serde_json::to_string(&r).unwrap_or_default();
        assert_eq!(
            s,
            r#"{"op":"exec","spec":{"cmd":["true"],"env":{},"cwd":null,"user":null,"timeout_secs":null,"stdin":false,"detach":false,"tag":null,"credentials":false}}"#
        );
        let back: Request = serde_json::from_str(r#"{"op":"list_dir","path":"/"}"#).expect("parse");
        assert_eq!(
            back,
            Request::ListDir {
                path: "/".into(),
                depth: 1
            }
        );
    }

    #[test]
    fn output_carries_base64() {
        let r = Reply::Output {
            seq: 3,
            stream: StreamKind::Stderr,
            data: b"hi\n".to_vec(),
        };
        let s = serde_json::to_string(&r).unwrap_or_default();
        assert_eq!(
            s,
            r#"{"reply":"output","seq":3,"stream":"stderr","data":"aGkK"}"#
        );
        let back: Reply = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, r);
    }

    #[test]
    fn stat_body_round_trips() {
        let stat = FileStat {
            path: "/etc".into(),
            name: "etc".into(),
            kind: FileKind::Dir,
            size: 4096,
            mode: 0o755,
            uid: 0,
            gid: 0,
            modified_ms: 1,
            symlink_target: None,
        };
        let r = Reply::Ok {
            body: Some(OkBody::Stat(stat)),
        };
        let s = serde_json::to_string(&r).unwrap_or_default();
        assert_eq!(
            s,
            r#"{"reply":"ok","body":{"type":"stat","path":"/etc","name":"etc","kind":"dir","size":4096,"mode":493,"uid":0,"gid":0,"modified_ms":1}}"#
        );
        let back: Reply = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, r);
    }
}
