//! Kiln images: a content-addressed store of read-only root filesystem layers, the build of
//! the Debian base layer (mmdebstrap or debootstrap), and templates built from Ansible roles
//! on top of it, one cached layer per role.
//!
//! What it does not do: start sandboxes (the sandbox runtime stacks layers with overlayfs;
//! `kiln template test` runs checks through the server).

pub mod ansible;
pub mod apt_sources;
pub mod base;
pub mod digest;
pub mod spec;
pub mod store;
pub mod template;

pub use base::{BaseSpec, Bootstrapper, Progress};
pub use spec::Sources;
pub use store::{ImageRef, ImageStore, LayerManifest, RoleLayer, TemplateManifest};
pub use template::{BuildEvent, BuildOptions, CacheState, GcReport};

/// Version of the on-disk layer format; part of every build key so a format change
/// rebuilds instead of reusing incompatible layers.
pub const LAYER_FORMAT_VERSION: u32 = 1;

/// Errors of the image store and builders.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template `{0}` is not built")]
    NotBuilt(String),
    #[error("unknown template `{name}`{}: no {name}.toml in {dir} (known: {known})", parent_of.as_ref().map(|c| format!(" (parent of `{c}`)")).unwrap_or_default())]
    UnknownTemplate {
        name: String,
        dir: String,
        known: String,
        parent_of: Option<String>,
    },
    #[error("template `{template}` uses unknown role `{role}`: no {roles_dir}/{role}/tasks/main.yml (known roles: {known})")]
    UnknownRole {
        role: String,
        template: String,
        roles_dir: String,
        known: String,
    },
    #[error("invalid template spec {path}: {message}")]
    InvalidSpec { path: String, message: String },
    #[error("role `{role}` failed at task `{task}`:\n{output}")]
    RoleFailed {
        role: String,
        task: String,
        output: String,
    },
    #[error("invalid template name `{0}`: use lower-case letters, digits, `-` and `_`")]
    InvalidName(String),
    #[error("no Debian mirror found in the host's apt sources ({0})")]
    NoMirror(String),
    #[error("`{tool}` is not installed: {hint}")]
    MissingTool { tool: String, hint: String },
    #[error("{tool} failed with {status}: {tail}")]
    ToolFailed {
        tool: String,
        status: String,
        tail: String,
    },
    #[error("corrupt image store entry {path}: {message}")]
    Corrupt { path: String, message: String },
    #[error("I/O error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
