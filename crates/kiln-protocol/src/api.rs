//! JSON bodies of Kiln's HTTP API under `/v1`.
//!
//! Streaming endpoints (exec output, process attach, file watch) answer with
//! `application/x-ndjson`: one JSON object per line, each an [`ExecEvent`] or a
//! [`crate::kilnd::WatchEvent`]. Errors are always an [`ErrorBody`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::kilnd::{ExitStatus, FileKind, FileStat, ProcessInfo, StreamKind, WatchEvent};

/// `{"error":{"code","message","hint"}}` — the body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The detail of an API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `sandbox_not_found`, `invalid_argument`.
    pub code: String,
    /// One human sentence saying what was wrong.
    pub message: String,
    /// How to fix it, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Network access of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Own network namespace with loopback only (the default).
    #[default]
    None,
    /// Own network namespace with a veth pair, bridged and NATed to the host's uplink.
    Full,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Template (image) name; default `base`.
    #[serde(default)]
    pub template: Option<String>,
    /// vCPUs (fractions allowed, e.g. 0.5); default from server config.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory limit: bytes as a number, or a size string like `"512M"`, `"1G"`.
    #[serde(default)]
    pub memory: Option<SizeArg>,
    /// Writable disk limit, same forms as `memory`.
    #[serde(default)]
    pub disk: Option<SizeArg>,
    #[serde(default)]
    pub network: Option<NetworkMode>,
    /// Auto-remove after this long: seconds as a number, or `"10m"`, `"1h30m"`.
    #[serde(default)]
    pub ttl: Option<DurationArg>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `false` skips the warm pool and always creates cold (benchmarks); default `true`:
    /// a matching idle pool member is claimed when there is one.
    #[serde(default)]
    pub pool: Option<bool>,
    /// Egress allow-list (implies network `full`): only these domains and IPv4 CIDRs are
    /// reachable; everything else is refused at once. Changeable later with
    /// `PUT /v1/sandboxes/{id}/egress`.
    #[serde(default)]
    pub egress: Option<EgressAllowList>,
}

/// Destinations a sandbox may reach (domains: exact or `*.suffix`; CIDRs: IPv4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EgressAllowList {
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub cidrs: Vec<String>,
}

/// A size given as bytes or as a human string (`512M`, `2G`, `100KiB`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum SizeArg {
    Bytes(u64),
    Text(String),
}

/// A duration given as seconds or a human string (`10m`, `90s`, `1h`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum DurationArg {
    Secs(f64),
    Text(String),
}

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being created; not usable yet (a create interrupted by a crash is cleaned up on start).
    Creating,
    Running,
    Paused,
    /// Its processes are gone (found at reconcile, or killed by OOM at PID 1); kept for
    /// inspection until removed.
    Dead,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Sandbox {
    pub id: String,
    pub template: String,
    /// Content address of the image the rootfs is built from.
    pub image: String,
    pub state: SandboxState,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub network: NetworkMode,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    /// Unix milliseconds after which the sandbox is removed, if it has a TTL.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// Whether create was served from the warm pool.
    #[serde(default)]
    pub from_pool: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Sandbox address on the Kiln bridge when `network` is `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/exec` (streams [`ExecEvent`]s) and
/// `POST /v1/sandboxes/{id}/processes` (starts detached, answers [`ProcessStarted`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Bytes to feed on stdin, base64; stdin is closed after them. Leave empty and set
    /// `keep_stdin_open` to write later with `POST .../processes/{pid}/stdin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    #[serde(default)]
    pub keep_stdin_open: bool,
    #[serde(default)]
    pub tag: Option<String>,
}

/// One line of an exec / attach NDJSON stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        pid: String,
        os_pid: u32,
    },
    Stdout {
        seq: u64,
        #[serde(with = "crate::b64")]
        #[cfg_attr(feature = "schema", schemars(with = "String"))]
        data: Vec<u8>,
    },
    Stderr {
        seq: u64,
        #[serde(with = "crate::b64")]
        #[cfg_attr(feature = "schema", schemars(with = "String"))]
        data: Vec<u8>,
    },
    /// Output with `seq` in `[from, to]` was dropped from the ring buffer before attach.
    Gap {
        from: u64,
        to: u64,
    },
    Exit(ExitStatus),
    /// The stream broke (sandbox removed, daemon gone); the process may still run.
    Error(ErrorDetail),
}

/// Answer of `POST /v1/sandboxes/{id}/processes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProcessStarted {
    pub pid: String,
    pub os_pid: u32,
}

/// `GET /v1/sandboxes/{id}/processes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// Number (`15`) or name (`TERM`, `SIGKILL`).
    pub signal: SignalArg,
}

/// A signal by number or name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum SignalArg {
    Number(i32),
    Name(String),
}

/// `GET /v1/sandboxes/{id}/files/list?path=..&depth=..`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FileList {
    pub entries: Vec<FileStat>,
}

/// `POST /v1/sandboxes/{id}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    pub path: String,
    #[serde(default = "yes")]
    pub parents: bool,
}

/// `POST /v1/sandboxes/{id}/files/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub overwrite: bool,
}

fn yes() -> bool {
    true
}

/// Text messages on the PTY WebSocket (`GET /v1/sandboxes/{id}/pty`). Binary messages carry
/// terminal bytes in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyMessage {
    /// Server -> client, first message: the session id (use `?session=ID` to re-attach).
    Opened { session: String },
    /// Client -> server.
    Resize { cols: u16, rows: u16 },
    /// Server -> client, last message.
    Exit(ExitStatus),
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Health {
    pub status: String,
    pub version: String,
    pub runtime: String,
    pub sandboxes: u64,
    pub warm_pool: u64,
}

/// One template/image the server knows (`GET /v1/templates`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Template {
    pub name: String,
    /// Content address (`sha256:...`) of its top layer.
    pub image: String,
    pub size_bytes: u64,
    pub created_at_ms: u64,
    /// Number of layers in its stack.
    #[serde(default)]
    pub layers: usize,
    /// Its roles, bottom first (empty for the plain Debian image).
    #[serde(default)]
    pub roles: Vec<String>,
    /// `fresh` (sources match the build), `stale` (a rebuild would change layers) or
    /// `no_spec` (no template spec, e.g. the debootstrap `debian` image).
    #[serde(default)]
    pub cache: String,
    /// `public` (a built-in template every organisation sees) or `private` (uploaded by the
    /// caller's organisation, invisible to others).
    #[serde(default)]
    pub visibility: String,
}

/// `GET /v1/templates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TemplateList {
    pub templates: Vec<Template>,
}

/// The role of an API key: what it may do inside its organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read-only: sandboxes (metadata), templates, keys, usage and the audit log.
    Auditor,
    /// Sandboxes, exec, files, templates; no key management.
    Member,
    /// Everything a member does, plus keys (up to admin) and the audit log.
    Admin,
    /// Everything in the organisation.
    Owner,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "auditor" => Some(Role::Auditor),
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// Per-organisation limits; `None` means the server default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Concurrent sandboxes (creating or running).
    #[serde(default)]
    pub sandboxes: Option<u64>,
    /// Total vCPUs of creating or running sandboxes.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Total memory of creating or running sandboxes, bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Total disk of all sandboxes (paused and dead ones keep their writable layer), bytes.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

/// What an organisation currently holds against its quota.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct QuotaUsage {
    pub sandboxes: u64,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// `GET /v1/orgs/{id}/quota`, `PUT /v1/orgs/{id}/quota`: effective limits and current use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct QuotaStatus {
    pub org: String,
    /// Effective limits (org overrides merged over server defaults).
    pub limits: Quota,
    /// The org's own overrides (`null` = server default).
    pub overrides: Quota,
    pub usage: QuotaUsage,
}

/// An organisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Org {
    pub id: String,
    pub name: String,
    pub created_at_ms: u64,
    /// The organisation created on first start; its owners and admins manage all others.
    #[serde(default)]
    pub system: bool,
}

/// `GET /v1/orgs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrgList {
    pub orgs: Vec<Org>,
}

/// `POST /v1/orgs`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    pub name: String,
    /// Also create a first key of this role in the new org (default `owner`).
    #[serde(default)]
    pub owner_key: Option<bool>,
}

/// `POST /v1/orgs` answer: the org and, unless declined, its first owner key (shown once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrgCreated {
    pub org: Org,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyCreated>,
}

/// An API key as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiKey {
    pub id: String,
    pub org: String,
    pub name: String,
    /// The first characters of the key (`kiln_AbCd1234`), to recognise it.
    pub prefix: String,
    pub role: Role,
    /// `resource:action` scopes narrowing the role; empty = everything the role allows.
    pub scopes: Vec<String>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub last_used_at_ms: Option<u64>,
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
}

/// `GET /v1/keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct KeyList {
    pub keys: Vec<ApiKey>,
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    pub name: Option<String>,
    /// Default `member`; never more than the creating key's role.
    #[serde(default)]
    pub role: Option<Role>,
    /// `resource:action` (`sandboxes:read`, `exec:write`, `files:*`, ...); never more than the
    /// creating key has.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Lifetime: seconds or `30d`, `12h`.
    #[serde(default)]
    pub expires_in: Option<DurationArg>,
    /// Create the key in this org (only keys of the system org may name another org).
    #[serde(default)]
    pub org: Option<String>,
}

/// `POST /v1/keys` answer: the key record and its secret, shown this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct KeyCreated {
    pub key: ApiKey,
    pub secret: String,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AuditEntry {
    pub id: String,
    pub time_ms: u64,
    /// Empty for auth failures with no valid key.
    pub org: String,
    pub key_prefix: String,
    /// `METHOD /route/pattern`.
    pub action: String,
    /// The concrete path acted on.
    pub resource: String,
    /// `ok` or `denied` / `error`.
    pub outcome: String,
    pub status: u16,
    pub client: String,
    pub request_id: String,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
}

/// A usage event as the API shows it: a CloudEvents 1.0 envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique and deterministic: replaying an event with a known id records nothing.
    pub id: String,
    /// The server that measured it, `kiln://<host id>`.
    pub source: String,
    /// `dev.kiln.sandbox.{started,usage,paused,resumed,stopped}`, or `dev.kiln.agent.tokens`
    /// for one model call of an agent run.
    #[serde(rename = "type")]
    pub kind: String,
    /// `org/<org>/key/<key>/sandbox/<sandbox>`, or `org/<org>/key/<key>/agent/<run>`.
    pub subject: String,
    /// RFC 3339.
    pub time: String,
    pub datacontenttype: String,
    pub data: UsageData,
}

/// What a usage event counts, for the window `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageData {
    pub org: String,
    pub key: String,
    pub sandbox: String,
    pub template: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub sandbox_seconds: f64,
    pub cpu_seconds: f64,
    pub memory_gib_seconds: f64,
    pub disk_gib_seconds: f64,
    /// Agent token events: the run and model of the call, its tokens and cost in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cost_usd: f64,
}

/// `GET /v1/usage/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageEventList {
    pub events: Vec<UsageEvent>,
}

/// Summed usage quantities.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageTotals {
    pub sandbox_seconds: f64,
    pub cpu_seconds: f64,
    pub memory_gib_seconds: f64,
    pub disk_gib_seconds: f64,
    /// LLM tokens of agent runs (input / output) and their cost in USD (the agent config's
    /// price table).
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cost_usd: f64,
    /// Events summed.
    pub events: u64,
}

/// One bucket (hour or UTC day) of usage, optionally for one key, sandbox or template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageBucket {
    /// Start of the bucket, RFC 3339.
    pub start: String,
    pub start_ms: u64,
    /// The key id, sandbox id, template, agent run or model this row is for (absent without
    /// `by`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(flatten)]
    pub usage: UsageTotals,
}

/// `GET /v1/usage`: an org's usage in `[from_ms, to_ms)` by bucket (and group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageReport {
    pub org: String,
    pub from_ms: u64,
    pub to_ms: u64,
    /// `hour` or `day`.
    pub granularity: String,
    /// `key`, `sandbox`, `template`, `agent` or `model` when grouped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    pub buckets: Vec<UsageBucket>,
    pub total: UsageTotals,
}

/// `GET /v1/me`: the calling key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Me {
    pub org: String,
    pub org_name: String,
    pub key_id: String,
    pub key_prefix: String,
    pub role: Role,
    /// Effective permissions (role narrowed by scopes).
    pub permissions: Vec<String>,
    pub system: bool,
}

/// One rate-limit bucket: a sustained rate and a burst (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_sec: f64,
    /// Requests allowed at once (bucket size).
    pub burst: u32,
}

/// Per-key rate limits of an organisation, one bucket per kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Management calls (listing, keys, orgs, audit, pause/resume, remove).
    pub manage: Rate,
    /// `POST /v1/sandboxes`.
    pub create: Rate,
    /// In-sandbox operations: exec, processes, files, PTY.
    pub sandbox: Rate,
}

/// `GET|PUT /v1/orgs/{org}/rate-limits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RateLimitStatus {
    pub org: String,
    /// Effective limits.
    pub limits: RateLimits,
    /// Whether the org overrides the server defaults.
    pub custom: bool,
}

/// An SSH public key registered to an organisation (`/v1/ssh-keys`): it opens SSH sessions
/// into that organisation's sandboxes (`ssh SANDBOX_ID@HOST`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SshKey {
    pub id: String,
    pub org: String,
    pub name: String,
    /// e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// `SHA256:...`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// The OpenSSH public-key line.
    pub public_key: String,
    pub created_at_ms: u64,
    /// The API key that registered it.
    pub created_by: Option<String>,
}

/// `GET /v1/ssh-keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SshKeyList {
    pub keys: Vec<SshKey>,
}

/// `POST /v1/ssh-keys`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AddSshKey {
    /// An OpenSSH public-key line (`ssh-ed25519 AAAA... comment`).
    pub public_key: String,
    /// Default: the key's comment, else its fingerprint.
    #[serde(default)]
    pub name: Option<String>,
}

/// `GET /v1/ssh`: how to reach the SSH front door of this server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SshInfo {
    /// Whether `kiln up` listens for SSH.
    pub enabled: bool,
    /// The port it listens on.
    pub port: Option<u16>,
    /// The server's host public key (OpenSSH line), for `known_hosts`.
    pub host_key: Option<String>,
}

/// A git credential stored for an organisation (`/v1/git-credentials`): used by clone, push
/// and pull in the organisation's sandboxes for a matching host. The password is never
/// shown again after it was stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCredential {
    pub id: String,
    pub org: String,
    /// `example.com` or `example.com:8443`.
    pub host: String,
    pub username: String,
    pub created_at_ms: u64,
    /// The API key that stored it.
    pub created_by: Option<String>,
    /// When git last got it from the host.
    pub last_used_at_ms: Option<u64>,
}

/// `GET /v1/git-credentials`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitCredentialList {
    pub credentials: Vec<GitCredential>,
}

/// `POST /v1/git-credentials`.
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AddGitCredential {
    /// The https host (`github.com`, `git.example.com:8443`).
    pub host: String,
    pub username: String,
    /// Password or access token; stored encrypted, never returned.
    pub password: String,
}

impl std::fmt::Debug for AddGitCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddGitCredential")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A commit identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GitAuthor {
    pub name: String,
    pub email: String,
}

/// `GET|PUT /v1/orgs/{org}/git`: an organisation's git defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GitDefaults {
    /// The author of commits whose call names none (`null`: Kiln's own default).
    #[serde(default)]
    pub author: Option<GitAuthor>,
}
