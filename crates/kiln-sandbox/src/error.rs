//! The error type of this crate, shaped so the HTTP layer can map each variant to a status.

use std::io;

/// Everything that can go wrong while managing sandboxes.
///
/// Suggested HTTP mapping: `NotFound` → 404, `AlreadyExists` → 409, `InvalidSpec` → 400,
/// `InvalidConfig`/`Host` → 500 at startup, `DaemonTimeout`/`Daemon`/`Runtime`/`Kernel`/`Io` → 500
/// (or 502 for `Daemon*`).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No sandbox with this id exists on this host.
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// A sandbox with this id already exists (or is being created right now).
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    /// The sandbox spec is unusable (bad id, limits out of range, missing layer ...).
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// The runtime configuration is unusable (paths too long, bad subnet ...).
    #[error("invalid runtime config: {0}")]
    InvalidConfig(String),
    /// The OCI runtime (runc) failed; `message` carries its own error text when it had one.
    #[error("{op} failed: {message}")]
    Runtime { op: String, message: String },
    /// A kernel operation (mount, ioctl, netlink, cgroup write ...) failed.
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    /// A host tool used during setup (mkfs, ip, nft ...) failed.
    #[error("host setup: {0}")]
    Host(String),
    /// Plain file-system I/O on Kiln's own state failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// kilnd answered with an error or could not be reached.
    #[error("kilnd: {0}")]
    Daemon(String),
    /// kilnd did not answer a ping in time after the container started.
    #[error(
        "kilnd in sandbox {id} did not answer within {waited_ms} ms; kilnd.log tail:\n{log_tail}"
    )]
    DaemonTimeout {
        id: String,
        waited_ms: u64,
        log_tail: String,
    },
}

/// Short alias used throughout the crate.
pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

impl SandboxError {
    pub(crate) fn kernel(op: impl Into<String>, source: io::Error) -> Self {
        SandboxError::Kernel {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn runtime(op: impl Into<String>, message: impl Into<String>) -> Self {
        SandboxError::Runtime {
            op: op.into(),
            message: message.into(),
        }
    }

    /// Whether this error means "the thing is already gone", which teardown paths ignore.
    pub fn is_not_found(&self) -> bool {
        match self {
            SandboxError::NotFound(_) => true,
            SandboxError::Kernel { source, .. } | SandboxError::Io { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
    fn kctx(self, op: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| SandboxError::io(context(), e))
    }
    fn kctx(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| SandboxError::kernel(op(), e))
    }
}
