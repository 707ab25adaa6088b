//! Template specs (`templates/NAME.toml`) and the Ansible role catalog (`ansible/roles/NAME`):
//! parsing, parent resolution, role dependency checks and the per-layer build keys.
//!
//! A spec names an optional parent template, roles in order and variables:
//! ```toml
//! description = "Python 3 with pip, venv, uv and pylsp"
//! parent = "base"            # absent: the Debian base image (debootstrap)
//! roles = ["python"]
//! [vars]
//! python_extra_pip = ["black"]
//! ```
//! Variables follow the Ansible convention of a role-name prefix (`python_*`); a role layer
//! sees (and its key covers) the variables of the roles it runs (itself and its `meta`
//! dependencies) plus every variable that has no role prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{io_err, TemplateError, LAYER_FORMAT_VERSION};

/// Where template specs and Ansible roles live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// Directory of `NAME.toml` specs.
    pub templates: PathBuf,
    /// The Ansible tree: `roles/`, `ansible.cfg`.
    pub ansible: PathBuf,
    /// An organisation's private specs (uploaded through the API), searched before
    /// `templates`; `None` for the public view.
    pub private: Option<PathBuf>,
}

impl Sources {
    /// Explicit directories, else `$KILN_TEMPLATES_DIR` / `$KILN_ANSIBLE_DIR`, else the source
    /// checkout Kiln was built from, else `/usr/share/kiln`.
    pub fn discover(templates: Option<PathBuf>, ansible: Option<PathBuf>) -> Self {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let default = |sub: &str| {
            let p = checkout.join(sub);
            if p.is_dir() {
                p
            } else {
                Path::new("/usr/share/kiln").join(sub)
            }
        };
        Self {
            templates: templates
                .or_else(|| env("KILN_TEMPLATES_DIR"))
                .unwrap_or_else(|| default("templates")),
            ansible: ansible
                .or_else(|| env("KILN_ANSIBLE_DIR"))
                .unwrap_or_else(|| default("ansible")),
            private: None,
        }
    }

    /// The same sources with an organisation's private specs searched first.
    pub fn with_private(&self, dir: PathBuf) -> Self {
        Self {
            private: Some(dir),
            ..self.clone()
        }
    }

    /// Whether `name` has a public spec (in `templates`).
    pub fn has_public(&self, name: &str) -> bool {
        self.templates.join(format!("{name}.toml")).is_file()
    }

    /// The file of `name`'s private spec, if it has one.
    pub fn private_spec(&self, name: &str) -> Option<PathBuf> {
        let p = self.private.as_ref()?.join(format!("{name}.toml"));
        p.is_file().then_some(p)
    }

    pub fn roles_dir(&self) -> PathBuf {
        self.ansible.join("roles")
    }

    /// Names of the templates with a spec (public and private), sorted.
    pub fn template_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::iter::once(&self.templates)
            .chain(self.private.as_ref())
            .flat_map(|dir| {
                std::fs::read_dir(dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .filter_map(|e| {
                                e.file_name()
                                    .to_str()?
                                    .strip_suffix(".toml")
                                    .map(str::to_string)
                            })
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// One `templates/NAME.toml` as written (also the body of an organisation's upload of a
/// private template, as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    #[serde(default)]
    pub description: String,
    /// Parent template; `None` = the Debian base image. For a private template: a public
    /// template or another private template of the organisation.
    #[serde(default)]
    pub parent: Option<String>,
    /// Ansible roles (`ansible/roles/*`), bottom first, after the parent's.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Role variables (a private template: only [`TENANT_VARIABLES`], plain values).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub vars: BTreeMap<String, toml::Value>,
}

/// A spec with its parents flattened: every role layer in build order.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTemplate {
    pub name: String,
    pub description: String,
    /// Roles bottom to top, parents' roles first.
    pub roles: Vec<String>,
    /// Variables merged along the parent chain (children override).
    pub vars: BTreeMap<String, serde_json::Value>,
}

/// Reads and flattens template `name`.
pub fn resolve(src: &Sources, name: &str) -> Result<ResolvedTemplate, TemplateError> {
    if !crate::store::valid_name(name) {
        return Err(TemplateError::InvalidName(name.to_string()));
    }
    let mut chain = Vec::new();
    let mut cur = Some(name.to_string());
    while let Some(n) = cur {
        if chain.iter().any(|(c, _): &(String, TemplateSpec)| *c == n) {
            return Err(TemplateError::InvalidSpec {
                path: src
                    .templates
                    .join(format!("{name}.toml"))
                    .display()
                    .to_string(),
                message: format!("parent chain loops through `{n}`"),
            });
        }
        let child = chain
            .last()
            .map(|(c, _): &(String, TemplateSpec)| c.clone());
        let spec = load_spec(src, &n, child.as_deref())?;
        cur = spec.parent.clone();
        chain.push((n, spec));
    }
    let mut roles = Vec::new();
    let mut vars = BTreeMap::new();
    let description = chain[0].1.description.clone();
    for (_, spec) in chain.iter().rev() {
        roles.extend(spec.roles.iter().cloned());
        for (k, v) in &spec.vars {
            vars.insert(
                k.clone(),
                serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
            );
        }
    }
    let t = ResolvedTemplate {
        name: name.to_string(),
        description,
        roles,
        vars,
    };
    // Every role and every dependency must exist, and a dependency must come earlier.
    for (i, r) in t.roles.iter().enumerate() {
        let deps = role_closure(src, r, name)?;
        for d in deps.iter().filter(|d| *d != r) {
            if !t.roles[..i].contains(d) {
                return Err(TemplateError::InvalidSpec {
                    path: src.templates.join(format!("{name}.toml")).display().to_string(),
                    message: format!(
                        "role `{r}` depends on role `{d}` (meta/main.yml), which is not an earlier role of the template; list `{d}` before `{r}`"
                    ),
                });
            }
        }
    }
    Ok(t)
}

fn load_spec(
    src: &Sources,
    name: &str,
    child: Option<&str>,
) -> Result<TemplateSpec, TemplateError> {
    let path = src
        .private_spec(name)
        .unwrap_or_else(|| src.templates.join(format!("{name}.toml")));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TemplateError::UnknownTemplate {
                name: name.to_string(),
                dir: src.templates.display().to_string(),
                known: src.template_names().join(", "),
                parent_of: child.map(str::to_string),
            })
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    parse(&text).map_err(|e| TemplateError::InvalidSpec {
        path: path.display().to_string(),
        message: e.message().to_string(),
    })
}

/// Parses the TOML of a spec.
pub fn parse(text: &str) -> Result<TemplateSpec, toml::de::Error> {
    toml::from_str(text)
}

/// Variables an organisation's private template may set. A build runs the shipped roles as
/// root on the host, so what a tenant controls stays small: names of things, never packages,
/// package indexes or anything Ansible would evaluate (values are also restricted to
/// [`safe_value`]).
pub const TENANT_VARIABLES: &[&str] = &[
    "base_locale",
    "git_default_branch",
    "git_user_name",
    "git_user_email",
    "ollama_host",
    "rust_toolchain",
    "rust_toolchain_source",
];

/// Whether a tenant's variable value is plain data: letters, digits and ` ._+=:/@,~^-`, no
/// word starting with `-`, at most 256 bytes. Nothing a shell, Jinja or a command line would
/// treat specially.
pub fn safe_value(v: &str) -> bool {
    v.len() <= 256
        && v.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b' ' | b'.'
                        | b'_'
                        | b'+'
                        | b'='
                        | b':'
                        | b'/'
                        | b'@'
                        | b','
                        | b'~'
                        | b'^'
                        | b'-'
                )
        })
        && v.split(' ').all(|w| !w.starts_with('-'))
}

/// Checks a spec an organisation uploads as its private template `name`: at most 32 roles
/// of the shipped catalog, a description of at most 500 printable characters, only
/// [`TENANT_VARIABLES`] with plain values (strings passing [`safe_value`], integers,
/// booleans), a parent that is not the template itself. The full check (the parent exists
/// and is visible, dependency order) is [`resolve`] with the organisation's sources.
pub fn check_private(name: &str, spec: &TemplateSpec) -> Result<(), TemplateError> {
    let invalid = |message: String| TemplateError::InvalidSpec {
        path: format!("private template {name}"),
        message,
    };
    if !crate::store::valid_name(name) {
        return Err(TemplateError::InvalidName(name.to_string()));
    }
    if spec.description.chars().count() > 500 || spec.description.chars().any(char::is_control) {
        return Err(invalid(
            "the description must be at most 500 characters without control characters".into(),
        ));
    }
    if spec.roles.len() > 32 {
        return Err(invalid(format!("{} roles; at most 32", spec.roles.len())));
    }
    if spec.parent.as_deref() == Some(name) {
        return Err(invalid("a template cannot be its own parent".into()));
    }
    if let Some(p) = &spec.parent {
        if !crate::store::valid_name(p) {
            return Err(TemplateError::InvalidName(p.clone()));
        }
    }
    for (k, v) in &spec.vars {
        if !TENANT_VARIABLES.contains(&k.as_str()) {
            return Err(invalid(format!(
                "variable `{k}` cannot be set by a private template (allowed: {})",
                TENANT_VARIABLES.join(", ")
            )));
        }
        let ok = match v {
            toml::Value::String(s) => safe_value(s),
            toml::Value::Integer(_) | toml::Value::Boolean(_) => true,
            _ => false,
        };
        if !ok {
            return Err(invalid(format!(
                "variable `{k}`: only plain strings (letters, digits, ` ._+=:/@,~^-`, no word starting with `-`), integers and booleans are allowed"
            )));
        }
    }
    Ok(())
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders a spec (as [`check_private`] accepts it) as the TOML [`resolve`] reads.
pub fn to_toml(spec: &TemplateSpec) -> String {
    let mut out = format!("description = {}\n", toml_string(&spec.description));
    if let Some(p) = &spec.parent {
        out.push_str(&format!("parent = {}\n", toml_string(p)));
    }
    let roles: Vec<String> = spec.roles.iter().map(|r| toml_string(r)).collect();
    out.push_str(&format!("roles = [{}]\n", roles.join(", ")));
    if !spec.vars.is_empty() {
        out.push_str("\n[vars]\n");
        for (k, v) in &spec.vars {
            let v = match v {
                toml::Value::String(s) => toml_string(s),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                // `check_private` admits nothing else; keep the value readable anyway.
                other => toml_string(&format!("{other:?}")),
            };
            out.push_str(&format!("{} = {v}\n", toml_string(k)));
        }
    }
    out
}

/// `role` and everything it depends on (through `meta/main.yml`), dependencies first.
pub fn role_closure(
    src: &Sources,
    role: &str,
    template: &str,
) -> Result<Vec<String>, TemplateError> {
    let mut out = Vec::new();
    visit(src, role, template, &mut out, &mut Vec::new())?;
    Ok(out)
}

fn visit(
    src: &Sources,
    role: &str,
    template: &str,
    out: &mut Vec<String>,
    stack: &mut Vec<String>,
) -> Result<(), TemplateError> {
    if out.iter().any(|r| r == role) {
        return Ok(());
    }
    if stack.iter().any(|r| r == role) {
        return Err(TemplateError::InvalidSpec {
            path: src
                .roles_dir()
                .join(role)
                .join("meta/main.yml")
                .display()
                .to_string(),
            message: format!("role dependency cycle: {} -> {role}", stack.join(" -> ")),
        });
    }
    let dir = src.roles_dir().join(role);
    if !valid_role_name(role) || !dir.join("tasks/main.yml").is_file() {
        return Err(TemplateError::UnknownRole {
            role: role.to_string(),
            template: template.to_string(),
            roles_dir: src.roles_dir().display().to_string(),
            known: role_names(src).join(", "),
        });
    }
    stack.push(role.to_string());
    for d in meta_dependencies(&dir.join("meta/main.yml"))? {
        visit(src, &d, template, out, stack)?;
    }
    stack.pop();
    out.push(role.to_string());
    Ok(())
}

fn valid_role_name(r: &str) -> bool {
    !r.is_empty()
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Roles present in the roles directory, sorted.
pub fn role_names(src: &Sources) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(src.roles_dir())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("tasks/main.yml").is_file())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The `dependencies:` of a role's `meta/main.yml`. Kiln reads the common forms
/// (`- name`, `- role: name`, `- { role: name }`) with a line parser rather than a YAML
/// library; Ansible itself reads the full file when it runs the role.
pub fn meta_dependencies(path: &Path) -> Result<Vec<String>, TemplateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in text.lines() {
        let l = line.split(" #").next().unwrap_or("").trim_end();
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        let indented = l.starts_with(' ') || l.starts_with('-');
        if !indented || l.starts_with("dependencies:") {
            in_deps = l.starts_with("dependencies:");
            continue;
        }
        if !in_deps {
            continue;
        }
        let t = l.trim();
        let item = if let Some(rest) = t.strip_prefix("- ") {
            rest.trim()
        } else if let Some(rest) = t.strip_prefix("role:") {
            rest.trim()
        } else {
            continue;
        };
        let item = item.trim_start_matches('{').trim_end_matches('}').trim();
        let item = item.strip_prefix("role:").map(str::trim).unwrap_or(item);
        let name = item
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        if !name.is_empty() && !name.contains(':') {
            deps.push(name.to_string());
        }
    }
    Ok(deps)
}

/// True when a variable belongs to one of `roles` or to no role at all.
fn var_applies(var: &str, roles: &[String], all_roles: &[String]) -> bool {
    let owner = all_roles
        .iter()
        .filter(|r| var.starts_with(&format!("{r}_")))
        .max_by_key(|r| r.len());
    match owner {
        Some(o) => roles.contains(o),
        None => true,
    }
}

/// The variables one role layer sees.
pub fn layer_vars(
    src: &Sources,
    t: &ResolvedTemplate,
    closure: &[String],
) -> BTreeMap<String, serde_json::Value> {
    let all = role_names(src);
    t.vars
        .iter()
        .filter(|(k, _)| var_applies(k, closure, &all))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The cache key of a role layer: the parent layer, the files of the role and of the roles
/// it depends on (their `tests/` excluded: checks do not change the image), the variables
/// it sees, the playbook Kiln wraps around it, and the layer format version.
pub fn layer_key(
    src: &Sources,
    parent: &str,
    closure: &[String],
    vars: &BTreeMap<String, serde_json::Value>,
    playbook: &str,
) -> Result<String, TemplateError> {
    let mut h = Sha256::new();
    h.update(format!(
        "kiln-layer-v{LAYER_FORMAT_VERSION}\nrole-layer\nparent={parent}\n"
    ));
    for r in closure {
        h.update(format!("role={r}\n"));
        let dir = src.roles_dir().join(r);
        let mut files = BTreeSet::new();
        list_files(&dir, &dir, &mut files)?;
        for rel in files {
            if rel.starts_with("tests/") {
                continue;
            }
            let p = dir.join(&rel);
            let bytes = std::fs::read(&p).map_err(io_err(&p))?;
            h.update(format!("file={rel} {}\n", bytes.len()));
            h.update(&bytes);
        }
    }
    h.update(serde_json::to_vec(vars).unwrap_or_default());
    h.update(playbook.as_bytes());
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn list_files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> Result<(), TemplateError> {
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let p = e.path();
        let ft = e.file_type().map_err(io_err(&p))?;
        if ft.is_dir() {
            list_files(root, &p, out)?;
        } else {
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .to_string();
            out.insert(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_specs_are_checked_and_round_trip_as_toml() {
        let mut spec = TemplateSpec {
            description: "team \"tools\" \\ x".into(),
            parent: Some("python".into()),
            roles: vec!["rust".into()],
            vars: BTreeMap::from([
                (
                    "git_user_name".to_string(),
                    toml::Value::String("Ada Lovelace".into()),
                ),
                (
                    "rust_toolchain".to_string(),
                    toml::Value::String("1.80.0".into()),
                ),
            ]),
        };
        check_private("mine", &spec).expect("valid");
        let back: TemplateSpec = toml::from_str(&to_toml(&spec)).expect("toml");
        assert_eq!(back, spec);
        for (k, v) in [
            ("python_extra_tools", toml::Value::String("evil".into())),
            (
                "git_user_name",
                toml::Value::String("{{ lookup('pipe','id') }}".into()),
            ),
            ("git_user_name", toml::Value::String("a; rm -rf /".into())),
            ("rust_toolchain", toml::Value::String("--evil".into())),
            ("ollama_host", toml::Value::Array(vec![])),
        ] {
            spec.vars = BTreeMap::from([(k.to_string(), v)]);
            assert!(check_private("mine", &spec).is_err(), "{k}");
        }
        spec.vars.clear();
        spec.parent = Some("mine".into());
        assert!(check_private("mine", &spec).is_err());
        assert!(check_private("Bad Name", &TemplateSpec::default()).is_err());
    }

    #[test]
    fn meta_dependency_forms() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("main.yml");
        std::fs::write(
            &p,
            "---\ngalaxy_info:\n  author: kiln\n  platforms:\n    - name: Debian\ndependencies:\n  - base\n  - role: git\n  - { role: 'node', when: x }\n",
        )
        .expect("write");
        assert_eq!(
            meta_dependencies(&p).expect("parse"),
            ["base", "git", "node"]
        );
        std::fs::write(&p, "dependencies: []\n").expect("write");
        assert!(meta_dependencies(&p).expect("parse").is_empty());
    }

    #[test]
    fn vars_go_to_their_role() {
        let all = vec![
            "base".to_string(),
            "python".to_string(),
            "python_extra".to_string(),
        ];
        let py = vec!["base".to_string(), "python".to_string()];
        assert!(var_applies("python_uv", &py, &all));
        assert!(var_applies("proxy", &py, &all));
        assert!(!var_applies("python_extra_x", &py, &all));
        assert!(!var_applies("python_uv", &["base".to_string()], &all));
    }
}
