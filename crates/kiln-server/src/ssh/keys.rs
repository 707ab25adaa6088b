//! `/v1/ssh-keys` (the SSH public keys of the caller's organisation) and `/v1/ssh` (where the
//! SSH front door listens and its host key). Adding and removing a key are audited by the
//! auth layer like every mutating call; listing and changing keys need the `keys`
//! permission (owners and admins), because a registered key opens every sandbox of the org.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use kiln_protocol::api::{AddSshKey, SshInfo, SshKey, SshKeyList};
use kiln_store::{SshKeyRow, StoreError};
use russh::keys::{HashAlg, PublicKey};

use crate::error::{ApiError, ApiJson};
use crate::service::{now_ms, AppState, Caller};

type ApiResult<T> = Result<T, ApiError>;

/// The routes, merged into `/v1` by `http::app`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ssh", get(info))
        .route("/ssh-keys", get(list).post(add))
        .route("/ssh-keys/:id", delete(remove))
}

fn view(r: SshKeyRow) -> SshKey {
    SshKey {
        id: r.id,
        org: r.org_id,
        name: r.name,
        algorithm: r.algorithm,
        fingerprint: r.fingerprint,
        public_key: r.public_key,
        created_at_ms: r.created_at_ms,
        created_by: r.created_by,
    }
}

/// `GET /v1/ssh`.
async fn info(State(k): State<AppState>) -> Json<SshInfo> {
    Json(match k.ssh.get() {
        Some(l) => SshInfo {
            enabled: true,
            port: Some(l.addr.port()),
            host_key: Some(l.host_key.clone()),
        },
        None => SshInfo {
            enabled: false,
            port: None,
            host_key: None,
        },
    })
}

/// `GET /v1/ssh-keys`.
async fn list(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<SshKeyList>> {
    let keys = k.store.list_ssh_keys(&c.org_id).await?;
    Ok(Json(SshKeyList {
        keys: keys.into_iter().map(view).collect(),
    }))
}

/// Parses an OpenSSH public-key line.
pub fn parse_public_key(line: &str) -> ApiResult<PublicKey> {
    let line = line.trim();
    let hint = "pass the contents of a public key file, e.g. ~/.ssh/id_ed25519.pub";
    if line.contains("PRIVATE KEY") {
        return Err(
            ApiError::invalid("that is a private key; never send it anywhere")
                .hint("pass the public key (the .pub file) instead"),
        );
    }
    PublicKey::from_openssh(line)
        .map_err(|e| ApiError::invalid(format!("not an OpenSSH public key: {e}")).hint(hint))
}

/// `POST /v1/ssh-keys` -> 201.
async fn add(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<AddSshKey>,
) -> ApiResult<(StatusCode, Json<SshKey>)> {
    let key = parse_public_key(&req.public_key)?;
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let comment = key.comment().to_string();
    let name = req
        .name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .or_else(|| (!comment.is_empty()).then_some(comment))
        .unwrap_or_else(|| fingerprint.clone());
    if name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "the key name must be at most 200 printable characters",
        ));
    }
    let public_key = key
        .to_openssh()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let row = SshKeyRow {
        id: kiln_store::random_id("sshk_", 12),
        org_id: c.org_id.clone(),
        name,
        algorithm: key.algorithm().to_string(),
        fingerprint,
        public_key,
        created_at_ms: now_ms(),
        created_by: Some(c.key_id.clone()),
    };
    match k.store.insert_ssh_key(&row).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(view(row)))),
        Err(StoreError::Conflict(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "ssh_key_exists",
            format!("the key {} is already registered", row.fingerprint),
        )
        .hint("list keys with `kiln ssh-key ls`")),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /v1/ssh-keys/{id or fingerprint}` -> 204.
async fn remove(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    match k.store.remove_ssh_key(&c.org_id, &id).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ssh_key_not_found",
            format!("no ssh key `{id}`"),
        )
        .hint("list keys with `kiln ssh-key ls` (remove by id or fingerprint)")),
    }
}
