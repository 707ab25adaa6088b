//! Agent configuration (TOML): provider endpoints, per-model facts (context window, prices,
//! native tool support), profiles (model, system prompt, allowed tools, approval policy,
//! budget) with the built-in `planner`, `coder`, `reviewer` and `tester`, and the policy
//! algebra that makes a sub-agent's permissions never exceed its parent's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::provider::{ApiKey, Endpoint, Protocol, Provider};

/// Configuration errors; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid agent config: {0}")]
    Parse(String),
    #[error("model `{0}` is not `provider/model`")]
    ModelName(String),
    #[error("unknown provider `{0}`")]
    UnknownProvider(String),
    #[error("unknown agent profile `{0}`")]
    UnknownProfile(String),
}

/// A configured provider endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub protocol: Protocol,
    pub base_url: String,
    /// The name of an environment variable of the server holding the key (never the key).
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// Facts about one model (`provider/model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelInfo {
    pub context_window: u64,
    pub max_output_tokens: u64,
    /// USD per million input / output tokens.
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    /// Whether the model calls tools natively; otherwise the text format is used.
    pub native_tools: bool,
}

impl Default for ModelInfo {
    fn default() -> Self {
        ModelInfo {
            context_window: 32_768,
            max_output_tokens: 4096,
            input_usd_per_mtok: 0.0,
            output_usd_per_mtok: 0.0,
            native_tools: true,
        }
    }
}

impl ModelInfo {
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_usd_per_mtok + output as f64 * self.output_usd_per_mtok) / 1e6
    }
}

/// What a policy says about an action, least to most restrictive.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Ask,
    Deny,
}

/// A rule on `exec` commands: `pattern` is matched against the command line, `*` matches
/// any run of characters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRule {
    pub pattern: String,
    pub decision: Decision,
}

/// An approval policy: a default, per-tool decisions and command patterns for `exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub default: Decision,
    pub tools: BTreeMap<String, Decision>,
    pub commands: Vec<CommandRule>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default: Decision::Allow,
            tools: BTreeMap::new(),
            commands: Vec::new(),
        }
    }
}

/// `*` glob match.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(p) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            match rest.find(p) {
                Some(pos) => rest = &rest[pos + p.len()..],
                None => return false,
            }
        }
    }
    true
}

impl Policy {
    /// The decision for a call of `tool`; `command` is the command line for `exec`. A tool
    /// key may be a `*` pattern (`fs__*` covers every tool of MCP server `fs`); an exact key
    /// wins over patterns, and among patterns the most restrictive decision.
    pub fn decide(&self, tool: &str, command: Option<&str>) -> Decision {
        let pattern = self
            .tools
            .iter()
            .filter(|(k, _)| k.contains('*') && glob_match(k, tool))
            .map(|(_, d)| *d)
            .max();
        let mut d = *self
            .tools
            .get(tool)
            .or(pattern.as_ref())
            .unwrap_or(&self.default);
        if let Some(cmd) = command {
            if let Some(r) = self.commands.iter().find(|r| glob_match(&r.pattern, cmd)) {
                d = d.max(r.decision);
            }
        }
        d
    }
}

/// A chain of policies (a sub-agent's own and all its ancestors'): the most restrictive
/// decision wins, so a child can never do what its parent may not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyChain(pub Vec<Policy>);

impl PolicyChain {
    pub fn decide(&self, tool: &str, command: Option<&str>) -> Decision {
        self.0
            .iter()
            .map(|p| p.decide(tool, command))
            .max()
            .unwrap_or(Decision::Allow)
    }
    pub fn with(&self, p: Policy) -> PolicyChain {
        let mut v = self.0.clone();
        v.push(p);
        PolicyChain(v)
    }
}

/// Hard limits of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    pub max_steps: Option<u64>,
    pub max_input_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub max_wall_secs: Option<f64>,
}

impl Budget {
    /// The tighter of two budgets, field by field.
    pub fn min(&self, o: &Budget) -> Budget {
        fn m<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(x), Some(y)) => Some(if y < x { y } else { x }),
                (x, None) => x,
                (None, y) => y,
            }
        }
        Budget {
            max_steps: m(self.max_steps, o.max_steps),
            max_input_tokens: m(self.max_input_tokens, o.max_input_tokens),
            max_output_tokens: m(self.max_output_tokens, o.max_output_tokens),
            max_cost_usd: m(self.max_cost_usd, o.max_cost_usd),
            max_wall_secs: m(self.max_wall_secs, o.max_wall_secs),
        }
    }
}

/// An agent profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// `provider/model`; empty = the config's default model.
    pub model: String,
    pub system_prompt: String,
    /// Allowed tools; `None` = every tool.
    pub tools: Option<Vec<String>>,
    pub policy: Policy,
    pub budget: Budget,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            model: String::new(),
            system_prompt: String::new(),
            tools: None,
            policy: Policy::default(),
            budget: Budget {
                max_steps: Some(50),
                max_wall_secs: Some(1800.0),
                ..Budget::default()
            },
        }
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Model used when a run names none.
    pub default_model: Option<String>,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: BTreeMap<String, ModelInfo>,
    pub profiles: BTreeMap<String, Profile>,
    /// Concurrent runs per organisation.
    pub max_concurrent_runs_per_org: Option<u64>,
    /// The message bus between agents (`kind = "local"`, the default, or `kind = "nats"`).
    pub bus: crate::bus::BusConfig,
    /// MCP servers whose tools agents may use.
    pub mcp: crate::mcp::McpConfig,
}

const READ_TOOLS: &[&str] = &[
    "read_file",
    "list",
    "glob",
    "grep",
    "git_status",
    "git_diff",
    "lsp_diagnostics",
    "lsp_definition",
    "lsp_references",
    "knowledge_search",
    "knowledge_context",
];
const AGENT_TOOLS: &[&str] = &[
    "spawn_agent",
    "send_message",
    "wait_agents",
    "list_agents",
    "close_agent",
];

fn builtin(name: &str) -> Option<Profile> {
    let tools = |extra: &[&str]| {
        Some(
            READ_TOOLS
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
    };
    let p = match name {
        "coder" => Profile {
            system_prompt:
                "You are a careful software engineer working in a sandbox at /workspace. \
                Make the requested change, run the tests, and finish with a short summary."
                    .into(),
            ..Profile::default()
        },
        "planner" => Profile {
            system_prompt: "You plan work: read the code, split the task into steps, delegate \
                steps to sub-agents (coder, tester, reviewer) and report the outcome."
                .into(),
            tools: tools(AGENT_TOOLS),
            ..Profile::default()
        },
        "reviewer" => Profile {
            system_prompt: "You review changes: read the diff and the code, and report problems \
                precisely. You do not change files."
                .into(),
            tools: tools(&["send_message"]),
            ..Profile::default()
        },
        "tester" => Profile {
            system_prompt: "You run and write tests, and report which pass and which fail.".into(),
            tools: tools(&["exec", "write_file", "edit", "send_message"]),
            ..Profile::default()
        },
        _ => return None,
    };
    Some(p)
}

impl AgentConfig {
    pub fn from_toml(s: &str) -> Result<AgentConfig, ConfigError> {
        toml::from_str(s).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// A profile by name: the config's, else a built-in one.
    pub fn profile(&self, name: &str) -> Result<Profile, ConfigError> {
        self.profiles
            .get(name)
            .cloned()
            .or_else(|| builtin(name))
            .ok_or_else(|| ConfigError::UnknownProfile(name.into()))
    }

    /// Every profile name (configured and built-in).
    pub fn profile_names(&self) -> Vec<String> {
        let mut v: Vec<String> = ["coder", "planner", "reviewer", "tester"]
            .iter()
            .map(|s| s.to_string())
            .chain(self.profiles.keys().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn model_info(&self, model: &str) -> ModelInfo {
        self.models.get(model).cloned().unwrap_or_default()
    }

    /// The provider client and the provider's model name for `provider/model`.
    pub fn provider(
        &self,
        model: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Provider, String), ConfigError> {
        let (prov, name) = model
            .split_once('/')
            .filter(|(p, m)| !p.is_empty() && !m.is_empty())
            .ok_or_else(|| ConfigError::ModelName(model.into()))?;
        let endpoint = match self.providers.get(prov) {
            Some(p) => Endpoint {
                name: prov.into(),
                protocol: p.protocol,
                base_url: p.base_url.trim_end_matches('/').into(),
                api_key: p.api_key_env.as_deref().and_then(env).map(ApiKey::new),
            },
            None => Endpoint::from_env(prov, env)
                .ok_or_else(|| ConfigError::UnknownProvider(prov.into()))?,
        };
        Ok((Provider::new(endpoint), name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_combine_to_the_most_restrictive() {
        let parent = Policy {
            default: Decision::Allow,
            tools: [("write_file".to_string(), Decision::Ask)].into(),
            commands: vec![CommandRule {
                pattern: "rm -rf *".into(),
                decision: Decision::Deny,
            }],
        };
        let child = Policy {
            default: Decision::Allow,
            tools: [("git_commit".to_string(), Decision::Deny)].into(),
            commands: vec![],
        };
        let chain = PolicyChain::default().with(parent).with(child);
        let got = [
            chain.decide("read_file", None),
            chain.decide("write_file", None),
            chain.decide("git_commit", None),
            chain.decide("exec", Some("rm -rf /workspace")),
            chain.decide("exec", Some("ls")),
        ];
        expect_test::expect!["[Allow, Ask, Deny, Deny, Allow]"].assert_eq(&format!("{got:?}"));
        // MCP tools by pattern: an exact key wins over a pattern.
        let mcp = PolicyChain::default().with(Policy {
            default: Decision::Allow,
            tools: [
                ("fs__*".to_string(), Decision::Ask),
                ("fs__read_text_file".to_string(), Decision::Allow),
                ("*__delete*".to_string(), Decision::Deny),
            ]
            .into(),
            commands: vec![],
        });
        let got = [
            mcp.decide("fs__write_file", None),
            mcp.decide("fs__read_text_file", None),
            mcp.decide("fs__delete_file", None),
            mcp.decide("calc__add", None),
        ];
        expect_test::expect!["[Ask, Allow, Deny, Allow]"].assert_eq(&format!("{got:?}"));
        assert!(glob_match("git push*", "git push origin"));
        assert!(!glob_match("git push*", "git status"));
        assert!(glob_match("*curl*", "sh -c 'curl x'"));
    }

    #[test]
    fn config_parses_and_resolves_providers() {
        let c = AgentConfig::from_toml(
            r#"
            default_model = "vllm/qwen"
            [providers.vllm]
            protocol = "openai"
            base_url = "http://10.0.0.1:8000/v1/"
            api_key_env = "VLLM_KEY"
            [models."vllm/qwen"]
            context_window = 8192
            input_usd_per_mtok = 1.0
            "#,
        )
        .expect("parse");
        let env = |k: &str| (k == "VLLM_KEY").then(|| "sekret".to_string());
        let (p, m) = c.provider("vllm/qwen", &env).expect("provider");
        assert_eq!(m, "qwen");
        assert_eq!(p.endpoint.base_url, "http://10.0.0.1:8000/v1");
        assert!(!format!("{p:?}").contains("sekret"));
        assert_eq!(c.model_info("vllm/qwen").context_window, 8192);
        let (o, m) = c
            .provider("ollama/qwen2.5-coder:7b", &|k: &str| {
                (k == "OLLAMA_HOST").then(|| "box:11434".into())
            })
            .expect("ollama");
        assert_eq!(
            (o.endpoint.base_url.as_str(), m.as_str()),
            ("http://box:11434", "qwen2.5-coder:7b")
        );
        assert!(c.provider("nope", &env).is_err());
        assert!(c.provider("mystery/x", &env).is_err());
        assert!(AgentConfig::from_toml("bogus = 1").is_err());
    }
}
