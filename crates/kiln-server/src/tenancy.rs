//! Tenancy: who a caller is ([`Caller`]), what roles and scopes allow ([`Perms`]), which
//! permission every route needs ([`required`]), API key minting and keyed hashing, and the
//! owner organisation/key created on first start.
//!
//! Architecture invariant: a key is stored only as HMAC-SHA256(server secret, key). The
//! secret lives in `<data dir>/secret` (0600), never in the database, so a database leak
//! alone does not let anyone verify or forge keys.
//!
//! Architecture invariant: every route under `/v1` needs an entry in [`required`]; a route
//! without one is refused for every key (403), so a new endpoint cannot be reachable by
//! accident.

use std::path::Path;

use axum::http::Method;
use hmac::{Hmac, Mac};
use kiln_protocol::api::Role;
use kiln_store::{KeyRow, OrgRow, Store, StoreError};
use sha2::Sha256;

/// Resources a permission is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Sandboxes = 0,
    Exec = 1,
    Files = 2,
    Templates = 3,
    Keys = 4,
    Orgs = 5,
    Audit = 6,
    Usage = 7,
    Knowledge = 8,
}

const RESOURCES: [(Resource, &str); 9] = [
    (Resource::Sandboxes, "sandboxes"),
    (Resource::Exec, "exec"),
    (Resource::Files, "files"),
    (Resource::Templates, "templates"),
    (Resource::Keys, "keys"),
    (Resource::Orgs, "orgs"),
    (Resource::Audit, "audit"),
    (Resource::Usage, "usage"),
    (Resource::Knowledge, "knowledge"),
];

/// A set of (resource, read|write) permissions as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(pub u32);

/// One permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    pub resource: Resource,
    pub write: bool,
}

impl Perm {
    pub const fn read(resource: Resource) -> Self {
        Perm {
            resource,
            write: false,
        }
    }
    pub const fn write(resource: Resource) -> Self {
        Perm {
            resource,
            write: true,
        }
    }
    fn bit(self) -> u32 {
        1 << (self.resource as u32 * 2 + self.write as u32)
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = RESOURCES
            .iter()
            .find(|(r, _)| *r == self.resource)
            .map(|(_, n)| *n)
            .unwrap_or("?");
        write!(f, "{name}:{}", if self.write { "write" } else { "read" })
    }
}

impl Perms {
    pub const ALL: Perms = Perms((1 << 18) - 1);

    pub fn of(perms: &[Perm]) -> Perms {
        Perms(perms.iter().fold(0, |acc, p| acc | p.bit()))
    }
    pub fn has(self, p: Perm) -> bool {
        self.0 & p.bit() != 0
    }
    pub fn contains(self, other: Perms) -> bool {
        other.0 & !self.0 == 0
    }
    pub fn and(self, other: Perms) -> Perms {
        Perms(self.0 & other.0)
    }
    /// The scopes naming exactly this set, for display.
    pub fn scopes(self) -> Vec<String> {
        let mut out = Vec::new();
        for (r, name) in RESOURCES {
            for w in [false, true] {
                let p = Perm {
                    resource: r,
                    write: w,
                };
                if self.has(p) {
                    out.push(format!("{name}:{}", if w { "write" } else { "read" }));
                }
            }
        }
        out
    }
}

/// What a role allows (before scopes narrow it).
pub fn role_perms(role: Role) -> Perms {
    use Resource::*;
    match role {
        Role::Owner | Role::Admin => Perms::ALL,
        Role::Member => Perms::of(&[
            Perm::read(Sandboxes),
            Perm::write(Sandboxes),
            Perm::read(Exec),
            Perm::write(Exec),
            Perm::read(Files),
            Perm::write(Files),
            Perm::read(Templates),
            Perm::read(Usage),
            Perm::read(Knowledge),
            Perm::write(Knowledge),
        ]),
        Role::Auditor => Perms::of(&[
            Perm::read(Sandboxes),
            Perm::read(Templates),
            Perm::read(Keys),
            Perm::read(Orgs),
            Perm::read(Audit),
            Perm::read(Usage),
            Perm::read(Knowledge),
        ]),
    }
}

/// Rank for "never more than the creator": owner > admin > member, auditor.
pub fn rank(role: Role) -> u8 {
    match role {
        Role::Owner => 3,
        Role::Admin => 2,
        Role::Member | Role::Auditor => 1,
    }
}

/// Parses `resource:action` scopes (`sandboxes:read`, `exec:write`, `files:*`, `*`).
pub fn parse_scopes(scopes: &[String]) -> Result<Perms, String> {
    if scopes.is_empty() {
        return Ok(Perms::ALL);
    }
    let mut out = Perms::default();
    for s in scopes {
        if s == "*" {
            out = Perms::ALL;
            continue;
        }
        let (res, act) = s.split_once(':').ok_or_else(|| {
            format!("scope `{s}` must be resource:action, like sandboxes:read or exec:write")
        })?;
        let r = RESOURCES
            .iter()
            .find(|(_, n)| *n == res)
            .map(|(r, _)| *r)
            .ok_or_else(|| {
                format!(
                    "unknown resource `{res}` in scope `{s}` (known: {})",
                    RESOURCES
                        .iter()
                        .map(|(_, n)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let acts: &[bool] = match act {
            "read" => &[false],
            "write" => &[true],
            "*" => &[false, true],
            _ => {
                return Err(format!(
                    "unknown action `{act}` in scope `{s}` (use read, write or *)"
                ))
            }
        };
        for w in acts {
            out.0 |= Perm {
                resource: r,
                write: *w,
            }
            .bit();
        }
    }
    Ok(out)
}

/// Who is calling: an authenticated API key of an organisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub org_id: String,
    pub key_id: String,
    pub key_prefix: String,
    pub role: Role,
    /// The key's effective permissions (role narrowed by scopes).
    pub perms: Perms,
    /// The key belongs to the system organisation (may manage other orgs).
    pub system: bool,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any valid key.
    Key,
    Perm(Perm),
}

/// The permission each `/v1` route needs: the one table of authorisation. `None` = the route
/// is unknown here and is refused.
pub fn required(method: &Method, route: &str) -> Option<Need> {
    use Resource::*;
    let read = !matches!(
        *method,
        Method::POST | Method::PUT | Method::DELETE | Method::PATCH
    );
    let rw = |r: Resource| {
        Some(Need::Perm(if read {
            Perm::read(r)
        } else {
            Perm::write(r)
        }))
    };
    let route = route.strip_prefix("/v1").unwrap_or(route);
    match route {
        "/me" | "/ssh" => Some(Need::Key),
        // A registered SSH key opens every sandbox of the org: managed like API keys.
        "/ssh-keys" | "/ssh-keys/:id" => rw(Keys),
        // A stored git credential acts for the whole org too; passwords are never readable.
        "/git-credentials" | "/git-credentials/:id" => rw(Keys),
        "/sandboxes" | "/sandboxes/:id" | "/sandboxes/:id/pause" | "/sandboxes/:id/resume" => {
            rw(Sandboxes)
        }
        "/sandboxes/:id/exec" | "/sandboxes/:id/pty" => Some(Need::Perm(Perm::write(Exec))),
        "/sandboxes/:id/processes"
        | "/sandboxes/:id/processes/:pid/output"
        | "/sandboxes/:id/processes/:pid/stdin"
        | "/sandboxes/:id/processes/:pid/signal" => rw(Exec),
        "/sandboxes/:id/files"
        | "/sandboxes/:id/files/stat"
        | "/sandboxes/:id/files/list"
        | "/sandboxes/:id/files/mkdir"
        | "/sandboxes/:id/files/move" => rw(Files),
        // Network policy is part of the sandbox; ports are read, a preview talks to the
        // sandbox's servers like exec does; git and language servers run processes in it.
        "/sandboxes/:id/egress" => rw(Sandboxes),
        "/sandboxes/:id/ports" => Some(Need::Perm(Perm::read(Sandboxes))),
        // A preview token lets its holder talk to the sandbox's server: as strong as a preview.
        "/sandboxes/:id/previews/:port/token" => Some(Need::Perm(Perm::write(Exec))),
        "/sandboxes/:id/ports/:port"
        | "/sandboxes/:id/ports/:port/"
        | "/sandboxes/:id/ports/:port/*path"
        | "/sandboxes/:id/git/:op"
        | "/sandboxes/:id/lsp/:op"
        | "/sandboxes/:id/lsp/ws" => Some(Need::Perm(Perm::write(Exec))),
        // A watch streams changes, a read.
        "/sandboxes/:id/files/watch" => Some(Need::Perm(Perm::read(Files))),
        r if r == "/templates" || r.starts_with("/templates/") => rw(Templates),
        "/keys" | "/keys/:id" => rw(Keys),
        "/orgs"
        | "/orgs/:org"
        | "/orgs/:org/quota"
        | "/orgs/:org/rate-limits"
        | "/orgs/:org/git" => rw(Orgs),
        "/audit" => Some(Need::Perm(Perm::read(Audit))),
        "/usage" | "/usage/events" => Some(Need::Perm(Perm::read(Usage))),
        // Agents run commands in sandboxes: reading runs is reading exec, acting is writing it.
        "/agents"
        | "/agents/:id"
        | "/agents/:id/events"
        | "/agents/:id/approvals/:call"
        | "/agents/:id/stop" => rw(Exec),
        // Search and context answer questions: reads, though they are POSTs.
        "/indexes/:name/search" | "/indexes/:name/context" => {
            Some(Need::Perm(Perm::read(Knowledge)))
        }
        "/indexes" | "/indexes/:name" | "/indexes/:name/sync" => rw(Knowledge),
        _ => None,
    }
}

/// The server secret that keys are hashed with.
#[derive(Clone)]
pub struct KeyHasher {
    secret: Vec<u8>,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

impl KeyHasher {
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    /// Reads `path` (hex), creating 32 random bytes there (0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(s) => {
                let bytes = hex::decode(s.trim()).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not hex: {e}", path.display()),
                    )
                })?;
                if bytes.len() < 16 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} holds fewer than 16 bytes", path.display()),
                    ));
                }
                Ok(Self::new(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use rand::RngCore;
                let mut b = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut b);
                crate::write_0600(path, &format!("{}\n", hex::encode(b)))?;
                // Another process may have won the race; use what is on disk.
                Self::load_or_create(path)
            }
            Err(e) => Err(e),
        }
    }

    /// A key for another purpose, derived from the secret: HMAC-SHA256(secret, `purpose`).
    /// The knowledge engine's master key is `derive("kiln knowledge")`.
    pub fn derive(&self, purpose: &str) -> Vec<u8> {
        match Hmac::<Sha256>::new_from_slice(&self.secret) {
            Ok(mut m) => {
                m.update(b"kiln derive\0");
                m.update(purpose.as_bytes());
                m.finalize().into_bytes().to_vec()
            }
            // HMAC accepts keys of any length; unreachable, but never panic.
            Err(_) => Vec::new(),
        }
    }

    /// HMAC-SHA256(secret, key), hex.
    pub fn hash(&self, key: &str) -> String {
        let mut m = match Hmac::<Sha256>::new_from_slice(&self.secret) {
            Ok(m) => m,
            // HMAC accepts keys of any length; unreachable, but never panic.
            Err(_) => return String::new(),
        };
        m.update(key.as_bytes());
        hex::encode(m.finalize().into_bytes())
    }
}

/// Key secrets: `kiln_` + 40 characters of [A-Za-z0-9] (238 bits).
pub fn new_key_secret() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let s: String = (0..40)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("kiln_{s}")
}

/// Whether `s` looks like a Kiln key (cheap pre-check before hashing).
pub fn looks_like_key(s: &str) -> bool {
    s.len() >= 20
        && s.len() <= 128
        && s.starts_with("kiln_")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The displayed prefix of a key: `kiln_` and 8 more characters.
pub fn key_prefix(secret: &str) -> String {
    secret.chars().take(13).collect()
}

/// A new key row for `secret`.
#[allow(clippy::too_many_arguments)]
pub fn key_row(
    hasher: &KeyHasher,
    secret: &str,
    org_id: &str,
    name: &str,
    role: Role,
    scopes: Vec<String>,
    created_by: Option<String>,
    expires_at_ms: Option<u64>,
    now_ms: u64,
) -> KeyRow {
    KeyRow {
        id: kiln_store::random_id("key_", 12),
        org_id: org_id.to_string(),
        name: name.to_string(),
        prefix: key_prefix(secret),
        hash: hasher.hash(secret),
        role: role.as_str().to_string(),
        scopes,
        created_at_ms: now_ms,
        created_by,
        expires_at_ms,
        last_used_at_ms: None,
        revoked_at_ms: None,
    }
}

/// Meta key naming the system organisation.
pub const SYSTEM_ORG_META: &str = "system_org";

/// Outcome of [`bootstrap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub system_org: String,
    /// The owner key, when this start created it (print it once) or imported it.
    pub created_key: Option<String>,
}

/// On first start: creates the system organisation and its owner key. An existing
/// `<data dir>/token` holding a `kiln_` key (from before organisations existed) becomes that
/// key, so the CLI keeps working unchanged; otherwise a new key is written there (0600).
/// Exactly one of several processes starting on one database wins.
pub async fn bootstrap(
    store: &Store,
    hasher: &KeyHasher,
    data_dir: &Path,
    now_ms: u64,
) -> Result<Bootstrap, crate::ServerError> {
    let candidate = kiln_store::random_id("org_", 12);
    let system_org = store.init_meta(SYSTEM_ORG_META, &candidate).await?;
    if system_org != candidate {
        // Already bootstrapped (by us earlier, or by another replica).
        store.adopt_orphans(&system_org).await?;
        return Ok(Bootstrap {
            system_org,
            created_key: None,
        });
    }
    let org = OrgRow {
        id: system_org.clone(),
        name: "system".into(),
        created_at_ms: now_ms,
        quota: Default::default(),
        rate_limits: None,
    };
    match store.create_org(&org).await {
        Ok(()) | Err(StoreError::Conflict(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let token_path = data_dir.join("token");
    let existing = std::fs::read_to_string(&token_path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| looks_like_key(t));
    let (secret, write) = match existing {
        Some(t) => (t, false),
        None => (new_key_secret(), true),
    };
    let row = key_row(
        hasher,
        &secret,
        &system_org,
        "owner",
        Role::Owner,
        vec![],
        None,
        None,
        now_ms,
    );
    store.insert_key(&row).await?;
    if write {
        crate::write_0600(&token_path, &format!("{secret}\n")).map_err(|source| {
            crate::ServerError::Io {
                path: token_path.display().to_string(),
                source,
            }
        })?;
    }
    store.adopt_orphans(&system_org).await?;
    Ok(Bootstrap {
        system_org,
        created_key: write.then_some(secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_narrow_roles() {
        let p = parse_scopes(&["sandboxes:read".into(), "files:*".into()]).expect("parse");
        expect_test::expect![[r#"["sandboxes:read", "files:read", "files:write"]"#]]
            .assert_eq(&format!("{:?}", p.scopes()));
        assert_eq!(parse_scopes(&[]).expect("empty"), Perms::ALL);
        let errs: Vec<String> = ["nope", "cats:read", "sandboxes:eat"]
            .iter()
            .map(|s| parse_scopes(&[s.to_string()]).expect_err("bad"))
            .collect();
        expect_test::expect![[r#"
            [
                "scope `nope` must be resource:action, like sandboxes:read or exec:write",
                "unknown resource `cats` in scope `cats:read` (known: sandboxes, exec, files, templates, keys, orgs, audit, usage, knowledge)",
                "unknown action `eat` in scope `sandboxes:eat` (use read, write or *)",
            ]
        "#]]
        .assert_debug_eq(&errs);
        assert!(role_perms(Role::Admin).contains(role_perms(Role::Member)));
        assert!(!role_perms(Role::Member).contains(role_perms(Role::Auditor)));
        assert!(!role_perms(Role::Auditor).has(Perm::write(Resource::Sandboxes)));
    }

    #[test]
    fn keys_hash_with_the_secret() {
        let a = KeyHasher::new(vec![1; 32]);
        let b = KeyHasher::new(vec![2; 32]);
        let k = new_key_secret();
        assert!(looks_like_key(&k) && k.len() == 45);
        assert_eq!(a.hash(&k), a.hash(&k));
        assert_ne!(a.hash(&k), b.hash(&k));
        assert!(!a.hash(&k).contains(&k[5..]));
        assert_eq!(key_prefix(&k).len(), 13);
    }

    #[test]
    fn every_route_has_a_permission() {
        for (m, r) in crate::http::ROUTES {
            assert!(
                required(&m.parse().expect("method"), r).is_some(),
                "{m} {r} has no entry in tenancy::required"
            );
        }
    }
}
