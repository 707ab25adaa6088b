//! Template endpoints: list, inspect, upload a private spec, build (streamed NDJSON
//! progress), remove and garbage collection of the image store. Kept apart from `http.rs`; the
//! router merges [`routes`].
//!
//! Public templates are the specs shipped in `templates/` ([`kiln_template::Sources::discover`]:
//! `KILN_TEMPLATES_DIR`, `KILN_ANSIBLE_DIR`, else the checkout the server was built from);
//! every organisation sees them, only the system organisation builds or removes them. An
//! organisation's private templates are specs it uploads (`PUT /v1/templates/{name}`) over
//! the shipped roles, kept in the image store under `orgs/<org>/templates/` and built into
//! its own refs (`orgs/<org>/refs/`); the layers they share with anything else are stored
//! once. Every lookup goes through [`Scope::locate`], so another organisation's private
//! template is indistinguishable from a missing one (404).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kiln_protocol::api::{Template, TemplateList};
use kiln_template::spec::{self, TemplateSpec};
use kiln_template::template::{self, BuildEvent, BuildOptions, GcReport, TemplateInfo};
use kiln_template::{ImageRef, ImageStore, Sources, TemplateError};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::service::{AppState, Caller};

/// How many private templates one organisation may keep.
const MAX_PRIVATE: usize = 100;

/// The template routes (mounted under `/v1`, behind authentication).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/templates", get(list_templates))
        .route("/templates/gc", post(gc))
        .route(
            "/templates/:name",
            get(inspect_template)
                .put(put_template)
                .delete(remove_template),
        )
        .route("/templates/:name/build", post(build_template))
}

fn sources() -> Sources {
    Sources::discover(None, None)
}

/// Where a name is found for one organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A spec or a ref of the caller's organisation.
    Private,
    /// A shipped spec or a public ref.
    Public,
    Nowhere,
}

/// The caller's view of templates: the public store and sources, and its own.
struct Scope {
    public: ImageStore,
    own: ImageStore,
    public_src: Sources,
    own_src: Sources,
}

impl Scope {
    fn of(images: &ImageStore, org: &str) -> Result<Scope, TemplateError> {
        let own = images.for_org(org)?;
        let public_src = sources();
        let own_src = public_src.with_private(own.org_specs_dir().unwrap_or_default());
        Ok(Scope {
            public: images.public(),
            own,
            public_src,
            own_src,
        })
    }

    fn locate(&self, name: &str) -> Found {
        if !kiln_template::store::valid_name(name) {
            return Found::Nowhere;
        }
        if self.own_src.private_spec(name).is_some()
            || self.own.ref_names().iter().any(|n| n == name)
        {
            Found::Private
        } else if self.public_src.has_public(name)
            || self.public.ref_names().iter().any(|n| n == name)
        {
            Found::Public
        } else {
            Found::Nowhere
        }
    }

    /// The store and sources a template of this kind lives in.
    fn of_kind(&self, f: Found) -> (&ImageStore, &Sources) {
        match f {
            Found::Private => (&self.own, &self.own_src),
            _ => (&self.public, &self.public_src),
        }
    }
}

/// The image a sandbox of `org` gets for template `name`: its own private template first,
/// then a public one. The flag says whether it is private (never served by the warm pool).
pub fn image_for(
    images: &ImageStore,
    org: Option<&str>,
    name: &str,
) -> Result<(ImageRef, bool), TemplateError> {
    if let Some(org) = org {
        match images.for_org(org)?.get(name) {
            Ok(r) => return Ok((r, true)),
            Err(TemplateError::NotBuilt(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((images.public().get(name)?, false))
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "template_not_found",
        format!("no template `{name}`"),
    )
    .hint("list templates with `kiln template ls` (GET /v1/templates)")
}

/// Maps template errors that only these endpoints produce; the rest go through `From`.
fn api_err(e: TemplateError) -> ApiError {
    match e {
        TemplateError::UnknownTemplate { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "template_not_found", e.to_string()).hint(
                "public templates are the templates/*.toml of the server's checkout; upload a private one with PUT /v1/templates/{name}",
            )
        }
        TemplateError::UnknownRole { .. } | TemplateError::InvalidSpec { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_template",
            e.to_string(),
        ),
        TemplateError::MissingTool { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "missing_tool",
            e.to_string(),
        ),
        TemplateError::RoleFailed { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "build_failed",
            e.to_string(),
        )
        .hint("fix the role and build again; the previous template stays usable"),
        other => other.into(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TemplateError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("template task failed: {e}")))?
        .map_err(api_err)
}

/// The listing entry of a built template.
pub fn to_template(t: TemplateInfo, visibility: &str) -> Template {
    Template {
        image: t.image.layers.first().cloned().unwrap_or_default(),
        size_bytes: t.image.size_bytes,
        created_at_ms: t.image.created_at_ms,
        layers: t.image.layers.len(),
        roles: t
            .image
            .template
            .as_ref()
            .map(|m| m.roles.iter().map(|r| r.role.clone()).collect())
            .unwrap_or_default(),
        cache: serde_json::to_value(t.cache)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        name: t.image.name,
        visibility: visibility.to_string(),
    }
}

/// `GET /v1/templates`: the public templates and the caller's private ones.
async fn list_templates(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<TemplateList>, ApiError> {
    let images = k.images.clone();
    let mut templates = blocking(move || {
        let s = Scope::of(&images, &c.org_id)?;
        let mut out: Vec<Template> = template::list(&s.public, &s.public_src)
            .into_iter()
            .map(|t| to_template(t, "public"))
            .collect();
        out.extend(
            template::list(&s.own, &s.own_src)
                .into_iter()
                .map(|t| to_template(t, "private")),
        );
        Ok(out)
    })
    .await?;
    templates.sort_by(|a, b| a.name.cmp(&b.name).then(a.visibility.cmp(&b.visibility)));
    Ok(Json(TemplateList { templates }))
}

/// `GET /v1/templates/{name}`: a built template's manifest, who sees it, and for a private
/// one the spec it was uploaded with.
#[derive(Debug, Serialize)]
struct Inspected {
    #[serde(flatten)]
    info: TemplateInfo,
    visibility: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<TemplateSpec>,
}

async fn inspect_template(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let images = k.images.clone();
    let n = name.clone();
    let found = blocking(move || {
        let s = Scope::of(&images, &c.org_id)?;
        let f = s.locate(&n);
        if f == Found::Nowhere {
            return Ok(None);
        }
        let (store, src) = s.of_kind(f);
        let info = template::info(store, src, &n)?;
        let spec = match f {
            Found::Private => s
                .own_src
                .private_spec(&n)
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| spec::parse(&t).ok()),
            _ => None,
        };
        Ok(Some(Inspected {
            info,
            visibility: if f == Found::Private {
                "private"
            } else {
                "public"
            },
            spec,
        }))
    })
    .await?;
    match found {
        Some(i) => Ok(Json(i).into_response()),
        None => Err(not_found(&name)),
    }
}

/// Answer of `PUT /v1/templates/{name}`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PrivateTemplate {
    pub name: String,
    /// Always `private`.
    pub visibility: String,
    /// Every role layer in build order (the parents' first).
    pub layers: Vec<String>,
    /// Whether a build of this name exists (it may predate this spec: build again).
    pub built: bool,
}

/// `PUT /v1/templates/{name}`: creates (201) or replaces (200) a private template of the
/// caller's organisation. A public template's name is taken (409).
async fn put_template(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(spec): ApiJson<TemplateSpec>,
) -> Result<Response, ApiError> {
    spec::check_private(&name, &spec).map_err(api_err)?;
    let images = k.images.clone();
    let (created, answer) = blocking(move || {
        let s = Scope::of(&images, &c.org_id)?;
        if s.locate(&name) == Found::Public {
            return Ok(Err(ApiError::new(
                StatusCode::CONFLICT,
                "template_name_taken",
                format!("`{name}` is a public template"),
            )
            .hint(
                "choose another name; a private template may use a public one as its parent",
            )));
        }
        let dir = s.own.org_specs_dir().unwrap_or_default();
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let path = dir.join(format!("{name}.toml"));
        let previous = std::fs::read_to_string(&path).ok();
        let kept = std::fs::read_dir(&dir).map_or(0, |rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".toml"))
                .count()
        });
        if previous.is_none() && kept >= MAX_PRIVATE {
            return Ok(Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_many_templates",
                format!("an organisation keeps at most {MAX_PRIVATE} private templates"),
            )
            .hint("remove one with `kiln template rm NAME`")));
        }
        write_atomic(&path, &spec::to_toml(&spec))?;
        // The whole chain must resolve with the organisation's view (parent visible, roles
        // known, dependencies in order); otherwise the previous spec comes back.
        match spec::resolve(&s.own_src, &name) {
            Ok(t) => Ok(Ok((
                previous.is_none(),
                PrivateTemplate {
                    built: s.own.get(&name).is_ok(),
                    name: name.clone(),
                    visibility: "private".into(),
                    layers: t.roles,
                },
            ))),
            Err(e) => {
                match previous {
                    Some(p) => write_atomic(&path, &p)?,
                    None => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                match e {
                    // A parent that does not exist (for this organisation) is a bad spec here.
                    TemplateError::UnknownTemplate { .. } => Ok(Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_template",
                        e.to_string(),
                    )
                    .hint("a parent is a public template or another private template of yours"))),
                    e => Err(e),
                }
            }
        }
    })
    .await??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)).into_response())
}

fn io(path: &std::path::Path, source: std::io::Error) -> TemplateError {
    TemplateError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_atomic(path: &std::path::Path, text: &str) -> Result<(), TemplateError> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// `DELETE /v1/templates/{name}`: a private template goes entirely (spec and ref); a public
/// one loses its ref (system organisation only). Layers go at the next gc.
async fn remove_template(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let images = k.images.clone();
    blocking(move || {
        let s = Scope::of(&images, &c.org_id)?;
        match s.locate(&name) {
            Found::Nowhere => Ok(Err(not_found(&name))),
            Found::Public if !c.system => Ok(Err(public_only(&c))),
            Found::Public => template::remove(&s.public, &name).map(|_| Ok(())),
            Found::Private => {
                match s.own.remove_ref(&name) {
                    Ok(()) | Err(TemplateError::NotBuilt(_)) => {}
                    Err(e) => return Err(e),
                }
                if let Some(p) = s.own_src.private_spec(&name) {
                    std::fs::remove_file(&p).map_err(|e| io(&p, e))?;
                }
                Ok(Ok(()))
            }
        }
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

fn public_only(c: &Caller) -> ApiError {
    crate::admin::system_only(c, "build or remove public templates")
        .err()
        .unwrap_or_else(|| ApiError::internal("public template check"))
}

/// Layers of live sandboxes are protected by their overlay mounts (see [`template::gc`]);
/// every organisation's private refs keep theirs.
async fn gc(State(k): State<AppState>) -> Result<Json<GcReport>, ApiError> {
    let images = k.images.clone();
    Ok(Json(
        blocking(move || template::gc(&images, &Default::default())).await?,
    ))
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BuildQuery {
    #[serde(default)]
    no_cache: bool,
}

/// Streams [`BuildEvent`]s as NDJSON; a failure ends the stream with
/// `{"event":"error","error":{code,message,hint}}`. Spec errors are answered before streaming.
/// Private templates build into the organisation's refs; public ones need the system
/// organisation.
async fn build_template(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<BuildQuery>,
) -> Result<Response, ApiError> {
    let (store, src) = {
        let (images, n, org) = (k.images.clone(), name.clone(), c.org_id.clone());
        let (f, store, src) = blocking(move || {
            let s = Scope::of(&images, &org)?;
            let f = s.locate(&n);
            let (store, src) = s.of_kind(f);
            let (store, src) = (store.clone(), src.clone());
            if f != Found::Nowhere {
                template::resolve(&src, &n)?;
            }
            Ok((f, store, src))
        })
        .await?;
        match f {
            Found::Nowhere => return Err(not_found(&name)),
            Found::Public if !c.system => return Err(public_only(&c)),
            _ => (store, src),
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    tokio::task::spawn_blocking(move || {
        let line = |v: &serde_json::Value| {
            let mut b = serde_json::to_vec(v).unwrap_or_default();
            b.push(b'\n');
            bytes::Bytes::from(b)
        };
        let opts = BuildOptions {
            no_cache: q.no_cache,
            mirror: None,
            ..BuildOptions::default()
        };
        let r = template::build(&store, &src, &name, &opts, &mut |ev: BuildEvent| {
            let _ = tx.send(line(&serde_json::to_value(&ev).unwrap_or_default()));
        });
        if let Err(e) = r {
            let body = api_err(e).body();
            let _ = tx.send(line(
                &serde_json::json!({"event": "error", "error": body.error}),
            ));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}
