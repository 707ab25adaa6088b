//! Control-plane handlers: the calling key (`/v1/me`), organisations and their quotas
//! (`/v1/orgs`), API keys (`/v1/keys`) and the audit log (`/v1/audit`). Permissions are
//! checked by the auth layer (`tenancy::required`); what is left here is visibility (through
//! [`Kiln::org`]) and the "never more than the creator" rules.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_protocol::api::{
    ApiKey, AuditEntry, AuditList, CreateKey, CreateOrg, KeyCreated, KeyList, Me, Org, OrgCreated,
    OrgList, Quota, QuotaStatus, RateLimitStatus, RateLimits, Role,
};
use kiln_store::{KeyRow, OrgRow};
use serde::Deserialize;

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::service::{now_ms, AppState, Caller, Kiln};
use crate::tenancy;

type ApiResult<T> = Result<T, ApiError>;

fn org_view(k: &Kiln, o: &OrgRow) -> Org {
    Org {
        id: o.id.clone(),
        name: o.name.clone(),
        created_at_ms: o.created_at_ms,
        system: o.id == k.system_org,
    }
}

fn key_view(r: &KeyRow) -> ApiKey {
    ApiKey {
        id: r.id.clone(),
        org: r.org_id.clone(),
        name: r.name.clone(),
        prefix: r.prefix.clone(),
        role: Role::parse(&r.role).unwrap_or(Role::Auditor),
        scopes: r.scopes.clone(),
        created_at_ms: r.created_at_ms,
        created_by: r.created_by.clone(),
        expires_at_ms: r.expires_at_ms,
        last_used_at_ms: r.last_used_at_ms,
        revoked_at_ms: r.revoked_at_ms,
    }
}

pub(crate) fn system_only(c: &Caller, what: &str) -> ApiResult<()> {
    if c.system {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_denied",
        format!("only keys of the system organisation can {what}"),
    )
    .hint("ask the operator of this Kiln server"))
}

/// `GET /v1/me`.
pub async fn me(State(k): State<AppState>, Extension(c): Extension<Caller>) -> ApiResult<Json<Me>> {
    let org = k.org(&c, &c.org_id).await?;
    Ok(Json(Me {
        org: c.org_id.clone(),
        org_name: org.name,
        key_id: c.key_id.clone(),
        key_prefix: c.key_prefix.clone(),
        role: c.role,
        permissions: c.perms.scopes(),
        system: c.system,
    }))
}

/// `GET /v1/orgs`: every org for the system organisation, else the caller's own.
pub async fn list_orgs(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<OrgList>> {
    let rows = if c.system {
        k.store.list_orgs().await?
    } else {
        vec![k.org(&c, &c.org_id).await?]
    };
    Ok(Json(OrgList {
        orgs: rows.iter().map(|o| org_view(&k, o)).collect(),
    }))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `POST /v1/orgs` (system organisation only): a new org and, by default, its first owner
/// key.
pub async fn create_org(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateOrg>,
) -> ApiResult<Response> {
    system_only(&c, "create organisations")?;
    if !valid_name(&req.name) || req.name.starts_with("org_") {
        return Err(ApiError::invalid(format!(
            "organisation name `{}` is invalid: use 1-64 lower-case letters, digits, `-` and `_` (not starting with org_)",
            req.name
        )));
    }
    let now = now_ms();
    let row = OrgRow {
        id: kiln_store::random_id("org_", 12),
        name: req.name.clone(),
        created_at_ms: now,
        quota: Quota::default(),
        rate_limits: None,
    };
    k.store.create_org(&row).await?;
    let key = if req.owner_key.unwrap_or(true) {
        let secret = tenancy::new_key_secret();
        let kr = tenancy::key_row(
            &k.hasher,
            &secret,
            &row.id,
            "owner",
            Role::Owner,
            vec![],
            Some(c.key_id.clone()),
            None,
            now,
        );
        k.store.insert_key(&kr).await?;
        Some(KeyCreated {
            key: key_view(&kr),
            secret,
        })
    } else {
        None
    };
    Ok((
        StatusCode::CREATED,
        Json(OrgCreated {
            org: org_view(&k, &row),
            key,
        }),
    )
        .into_response())
}

/// `GET /v1/orgs/{org}`.
pub async fn get_org(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(org): Path<String>,
) -> ApiResult<Json<Org>> {
    let o = k.org(&c, &org).await?;
    Ok(Json(org_view(&k, &o)))
}

async fn quota_status(k: &Kiln, o: &OrgRow) -> ApiResult<QuotaStatus> {
    let l = k.limits(&o.id).await?;
    Ok(QuotaStatus {
        org: o.id.clone(),
        limits: Quota {
            sandboxes: Some(l.sandboxes),
            cpus: Some(l.cpus),
            memory_bytes: Some(l.memory_bytes),
            disk_bytes: Some(l.disk_bytes),
        },
        overrides: o.quota.clone(),
        usage: k.store.usage(&o.id).await?,
    })
}

/// `GET /v1/orgs/{org}/quota`: limits and current use.
pub async fn get_quota(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(org): Path<String>,
) -> ApiResult<Json<QuotaStatus>> {
    let o = k.org(&c, &org).await?;
    Ok(Json(quota_status(&k, &o).await?))
}

/// `PUT /v1/orgs/{org}/quota` (system organisation only): replaces the org's overrides;
/// `null` fields fall back to the server defaults.
pub async fn set_quota(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(org): Path<String>,
    ApiJson(q): ApiJson<Quota>,
) -> ApiResult<Json<QuotaStatus>> {
    let o = k.org(&c, &org).await?;
    system_only(&c, "change quotas")?;
    if let Some(cpus) = q.cpus {
        if !(cpus.is_finite() && cpus >= 0.0) {
            return Err(ApiError::invalid(format!(
                "cpus must be a non-negative number, got {cpus}"
            )));
        }
    }
    k.store.set_quota(&o.id, &q).await?;
    let o = k.org(&c, &o.id).await?;
    Ok(Json(quota_status(&k, &o).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
pub struct OrgQuery {
    #[serde(default)]
    org: Option<String>,
}

/// The org a key request is about: the caller's, or `?org=` for the system organisation.
async fn target_org(k: &Kiln, c: &Caller, org: Option<&str>) -> ApiResult<String> {
    match org {
        None => Ok(c.org_id.clone()),
        Some(o) => Ok(k.org(c, o).await?.id),
    }
}

/// `GET /v1/keys[?org=]`.
pub async fn list_keys(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<OrgQuery>,
) -> ApiResult<Json<KeyList>> {
    let org = target_org(&k, &c, q.org.as_deref()).await?;
    Ok(Json(KeyList {
        keys: k
            .store
            .list_keys(&org)
            .await?
            .iter()
            .map(key_view)
            .collect(),
    }))
}

/// `POST /v1/keys`: a new key, never with more rights than the calling key (role rank and
/// effective permissions).
pub async fn create_key(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateKey>,
) -> ApiResult<Response> {
    let org = target_org(&k, &c, req.org.as_deref()).await?;
    let role = req.role.unwrap_or(Role::Member);
    let scopes = tenancy::parse_scopes(&req.scopes).map_err(ApiError::invalid)?;
    let perms = tenancy::role_perms(role).and(scopes);
    if tenancy::rank(role) > tenancy::rank(c.role) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!(
                "a {} key cannot create a {} key",
                c.role.as_str(),
                role.as_str()
            ),
        )
        .hint("a key can create keys up to its own role"));
    }
    if !c.perms.contains(perms) {
        let extra = tenancy::Perms(perms.0 & !c.perms.0).scopes().join(", ");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!("the new key would have permissions this key lacks: {extra}"),
        )
        .hint("narrow it with --scope to permissions the creating key has"));
    }
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| role.as_str().to_string());
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::invalid("key name must be 1-128 bytes"));
    }
    let now = now_ms();
    let expires_at_ms = match &req.expires_in {
        Some(d) => {
            let d = crate::units::duration_arg(d)
                .map_err(|e| ApiError::invalid(format!("expires_in: {e}")))?;
            if d.is_zero() {
                return Err(ApiError::invalid("expires_in must be greater than zero"));
            }
            Some(now.saturating_add(d.as_millis().min(u64::MAX as u128) as u64))
        }
        None => None,
    };
    let secret = tenancy::new_key_secret();
    let row = tenancy::key_row(
        &k.hasher,
        &secret,
        &org,
        &name,
        role,
        req.scopes.clone(),
        Some(c.key_id.clone()),
        expires_at_ms,
        now,
    );
    k.store.insert_key(&row).await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            key: key_view(&row),
            secret,
        }),
    )
        .into_response())
}

/// `DELETE /v1/keys/{id}[?org=]` (id or prefix): revokes at once.
pub async fn revoke_key(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<OrgQuery>,
) -> ApiResult<StatusCode> {
    let org = target_org(&k, &c, q.org.as_deref()).await?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no key `{id}`"),
        )
        .hint("list keys with `kiln key ls`")
    };
    let key = k.store.get_key(&org, &id).await?.ok_or_else(not_found)?;
    let role = Role::parse(&key.role).unwrap_or(Role::Owner);
    if tenancy::rank(role) > tenancy::rank(c.role) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!(
                "a {} key cannot revoke a {} key",
                c.role.as_str(),
                role.as_str()
            ),
        ));
    }
    if !k.store.revoke_key(&org, &key.id, now_ms()).await? && key.revoked_at_ms.is_none() {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, schemars::JsonSchema)]
pub struct AuditQuery {
    /// Unix ms.
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    org: Option<String>,
}

/// `GET /v1/audit`: newest first. The system organisation also sees refusals of requests
/// that carried no valid key.
pub async fn list_audit(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    let org = target_org(&k, &c, q.org.as_deref()).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    // Read-your-writes: entries of calls answered before this one are stored first.
    k.audit.flush().await;
    let mut rows = k.store.list_audit(&org, q.since, limit).await?;
    if c.system && q.org.is_none() {
        rows.extend(k.store.list_audit("", q.since, limit).await?);
        rows.sort_by(|a, b| (b.time_ms, &b.id).cmp(&(a.time_ms, &a.id)));
        rows.truncate(limit as usize);
    }
    Ok(Json(AuditList {
        entries: rows
            .into_iter()
            .map(|a| AuditEntry {
                id: a.id,
                time_ms: a.time_ms,
                org: a.org_id,
                key_prefix: a.key_prefix,
                action: a.action,
                resource: a.resource,
                outcome: a.outcome,
                status: a.status,
                client: a.client,
                request_id: a.request_id,
            })
            .collect(),
    }))
}

async fn rate_status(k: &Kiln, o: &OrgRow) -> ApiResult<RateLimitStatus> {
    Ok(RateLimitStatus {
        org: o.id.clone(),
        limits: o.rate_limits.unwrap_or(k.cfg.rate_limits),
        custom: o.rate_limits.is_some(),
    })
}

/// `GET /v1/orgs/{org}/rate-limits`.
pub async fn get_rate_limits(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(org): Path<String>,
) -> ApiResult<Json<RateLimitStatus>> {
    let o = k.org(&c, &org).await?;
    Ok(Json(rate_status(&k, &o).await?))
}

/// `PUT /v1/orgs/{org}/rate-limits` (system organisation only); `null` restores the defaults.
pub async fn set_rate_limits(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(org): Path<String>,
    ApiJson(l): ApiJson<Option<RateLimits>>,
) -> ApiResult<Json<RateLimitStatus>> {
    let o = k.org(&c, &org).await?;
    system_only(&c, "change rate limits")?;
    if let Some(l) = &l {
        for (name, r) in [
            ("manage", l.manage),
            ("create", l.create),
            ("sandbox", l.sandbox),
        ] {
            if !(r.per_sec.is_finite() && r.per_sec > 0.0 && r.burst >= 1) {
                return Err(ApiError::invalid(format!(
                    "{name}: per_sec must be a positive number and burst at least 1"
                )));
            }
        }
    }
    k.store.set_rate_limits(&o.id, l.as_ref()).await?;
    k.forget_rate_limits(&o.id);
    let o = k.org(&c, &o.id).await?;
    Ok(Json(rate_status(&k, &o).await?))
}
