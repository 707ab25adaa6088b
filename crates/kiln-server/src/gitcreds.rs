//! An organisation's git settings: its default commit author (`/v1/orgs/{org}/git`) and its
//! stored credentials for https git hosts (`/v1/git-credentials`). Passwords are sealed with
//! AES-256-GCM under a key derived from the server secret (HMAC of a fixed label), bound to
//! their row (org, host, username as associated data), stored only sealed, and never
//! returned by any endpoint. Clone, push and pull hand a matching credential to git through
//! kilnd's credential relay ([`stored_credentials`]); it never enters the sandbox's files or
//! environment. Managing them needs the `keys` permission (owners and admins), like SSH
//! keys: a stored credential acts for the whole organisation.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use kiln_devtools::git::{Credential, Identity};
use kiln_protocol::api::{
    AddGitCredential, GitAuthor, GitCredential, GitCredentialList, GitDefaults,
};
use kiln_store::{GitCredentialRow, StoreError};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::error::{ApiError, ApiJson};
use crate::service::{now_ms, AppState, Caller, Kiln};

type ApiResult<T> = Result<T, ApiError>;

/// The routes, merged into `/v1` by `http::app`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/git-credentials", get(list).post(add))
        .route("/git-credentials/:id", delete(remove))
        .route("/orgs/:org/git", get(get_defaults).put(put_defaults))
}

/// Sealed values start with this (the format version).
const SEALED_PREFIX: &str = "v1:";

fn aead_key(k: &Kiln) -> ApiResult<LessSafeKey> {
    let derived = hex::decode(k.hasher.hash("kiln git credentials v1"))
        .map_err(|e| ApiError::internal(format!("credential key: {e}")))?;
    let key = UnboundKey::new(&AES_256_GCM, &derived)
        .map_err(|_| ApiError::internal("credential key: bad length"))?;
    Ok(LessSafeKey::new(key))
}

fn aad(org: &str, host: &str, username: &str) -> Vec<u8> {
    format!("{org}\n{host}\n{username}").into_bytes()
}

/// Seals a password for one row: `v1:` + base64(nonce || ciphertext || tag).
fn seal(k: &Kiln, org: &str, host: &str, username: &str, password: &str) -> ApiResult<String> {
    use rand::RngCore;
    let key = aead_key(k)?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut buf = password.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad(org, host, username)),
        &mut buf,
    )
    .map_err(|_| ApiError::internal("sealing a credential failed"))?;
    let mut out = nonce.to_vec();
    out.extend(buf);
    Ok(format!(
        "{SEALED_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    ))
}

/// Opens a sealed password; `None` if it was sealed under another secret or for another row.
fn open(k: &Kiln, row: &GitCredentialRow) -> Option<String> {
    let key = aead_key(k).ok()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(row.secret.strip_prefix(SEALED_PREFIX)?)
        .ok()?;
    if raw.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    let mut buf = sealed.to_vec();
    let plain = key
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).ok()?,
            Aad::from(aad(&row.org_id, &row.host, &row.username)),
            &mut buf,
        )
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

fn view(r: GitCredentialRow) -> GitCredential {
    GitCredential {
        id: r.id,
        org: r.org_id,
        host: r.host,
        username: r.username,
        created_at_ms: r.created_at_ms,
        created_by: r.created_by,
        last_used_at_ms: r.last_used_at_ms,
    }
}

/// `host` or `host:port`, lower-cased; what git's credential helper is asked about.
pub fn normalize_host(h: &str) -> Option<String> {
    let h = h.trim().to_ascii_lowercase();
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h.as_str(), None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    (name_ok && port_ok).then_some(h)
}

/// git's credential protocol is line-based: no line breaks or NULs in what we hand it.
fn protocol_safe(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.contains(['\n', '\r', '\0'])
}

/// `GET /v1/git-credentials`: the organisation's credentials, without passwords.
async fn list(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<GitCredentialList>> {
    let rows = k.store.list_git_credentials(&c.org_id).await?;
    Ok(Json(GitCredentialList {
        credentials: rows.into_iter().map(view).collect(),
    }))
}

/// `POST /v1/git-credentials` -> 201 (without the password).
async fn add(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<AddGitCredential>,
) -> ApiResult<(StatusCode, Json<GitCredential>)> {
    let host = normalize_host(&req.host).ok_or_else(|| {
        ApiError::invalid(format!("`{}` is not a host name", req.host))
            .hint("give the host of the https remote, e.g. github.com or git.example.com:8443")
    })?;
    if !protocol_safe(&req.username, 256) || !protocol_safe(&req.password, 4096) {
        return Err(ApiError::invalid(
            "the username (1-256 bytes) and password (1-4096 bytes) must be one line each",
        ));
    }
    let row = GitCredentialRow {
        id: kiln_store::random_id("gitc_", 12),
        secret: seal(&k, &c.org_id, &host, &req.username, &req.password)?,
        org_id: c.org_id.clone(),
        host,
        username: req.username.clone(),
        created_at_ms: now_ms(),
        created_by: Some(c.key_id.clone()),
        last_used_at_ms: None,
    };
    match k.store.insert_git_credential(&row).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(view(row)))),
        Err(StoreError::Conflict(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "git_credential_exists",
            format!("a credential for {} is already stored", row.host),
        )
        .hint("remove it first: `kiln git-credential rm HOST`")),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /v1/git-credentials/{id or host}` -> 204.
async fn remove(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    match k.store.remove_git_credential(&c.org_id, &id).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "git_credential_not_found",
            format!("no git credential `{id}`"),
        )
        .hint("list them with `kiln git-credential ls` (remove by id or host)")),
    }
}

/// The organisation's stored credentials, opened, for a clone/push/pull of `caller`. A
/// credential that no longer opens (the server secret changed) is skipped with a warning.
pub async fn stored_credentials(k: &Kiln, caller: &Caller) -> ApiResult<Vec<Credential>> {
    let rows = k.store.list_git_credentials(&caller.org_id).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        match open(k, &r) {
            Some(password) => out.push(Credential {
                host: Some(r.host.clone()),
                username: r.username.clone(),
                password,
                id: Some(r.id.clone()),
            }),
            None => {
                tracing::warn!(id = %r.id, host = %r.host, "a stored git credential does not open (was the server secret replaced?)")
            }
        }
    }
    Ok(out)
}

/// Records that git was given stored credentials `ids` during a call of `caller`: their
/// last-used time, and one audit entry each.
pub async fn record_use(k: &Kiln, caller: &Caller, ids: &[String], request_id: &str) {
    let now = now_ms();
    for (i, id) in ids.iter().enumerate() {
        if let Err(e) = k.store.touch_git_credential(id, now).await {
            tracing::warn!(error = %e, "git credential last-used time");
        }
        k.audit.append(kiln_store::AuditRow {
            id: format!("au_{now:013}_gitc{i:04}{}", kiln_store::random_id("_", 6)),
            time_ms: now,
            org_id: caller.org_id.clone(),
            key_prefix: caller.key_prefix.clone(),
            action: "git credential used".into(),
            resource: format!("/v1/git-credentials/{id}"),
            outcome: "ok".into(),
            status: 0,
            client: String::new(),
            request_id: request_id.to_string(),
        });
    }
}

/// The author of a commit whose call names none: the organisation's default, else Kiln's.
pub async fn default_author(k: &Kiln, org: &str) -> ApiResult<Identity> {
    Ok(match k.store.git_author(org).await? {
        Some((name, email)) => Identity { name, email },
        None => Identity {
            name: "Kiln Agent".into(),
            email: "agent@kiln.invalid".into(),
        },
    })
}

/// `GET /v1/orgs/{org}/git`.
async fn get_defaults(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(org): Path<String>,
) -> ApiResult<Json<GitDefaults>> {
    let o = k.org(&c, &org).await?;
    let author = k
        .store
        .git_author(&o.id)
        .await?
        .map(|(name, email)| GitAuthor { name, email });
    Ok(Json(GitDefaults { author }))
}

fn check_author(a: &GitAuthor) -> ApiResult<()> {
    let printable = |s: &str, max: usize| {
        !s.trim().is_empty()
            && s.len() <= max
            && !s.chars().any(|c| c.is_control() || c == '<' || c == '>')
    };
    if !printable(&a.name, 200) {
        return Err(ApiError::invalid(
            "the author name must be 1-200 printable characters without < or >",
        ));
    }
    if !printable(&a.email, 254) || !a.email.contains('@') || a.email.contains(char::is_whitespace)
    {
        return Err(ApiError::invalid(format!(
            "`{}` is not an email address",
            a.email
        )));
    }
    Ok(())
}

/// `PUT /v1/orgs/{org}/git` (owners and admins of the organisation): `{"author": null}`
/// restores Kiln's default.
async fn put_defaults(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(org): Path<String>,
    ApiJson(req): ApiJson<GitDefaults>,
) -> ApiResult<Json<GitDefaults>> {
    let o = k.org(&c, &org).await?;
    if let Some(a) = &req.author {
        check_author(a)?;
    }
    k.store
        .set_git_author(
            &o.id,
            req.author
                .as_ref()
                .map(|a| (a.name.as_str(), a.email.as_str())),
            now_ms(),
        )
        .await?;
    Ok(Json(req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized_or_refused() {
        assert_eq!(normalize_host("GitHub.com").as_deref(), Some("github.com"));
        assert_eq!(
            normalize_host("git.example.com:8443").as_deref(),
            Some("git.example.com:8443")
        );
        for bad in [
            "",
            "https://github.com",
            "a b",
            "x:0",
            "x:99999",
            "-x",
            "a/b",
            "h\nx",
        ] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
    }
}
