//! The message bus between agents: the [`Bus`] trait, the in-process [`LocalBus`] (the
//! default) and [`NatsBus`], which carries messages over NATS JetStream so agents driven by
//! several server processes can message each other. Chosen by the `[bus]` table of the agent
//! config ([`BusConfig`]).
//!
//! NATS layout: one work-queue stream (default `KILN_AGENT_BUS`) over `<prefix>.*`; a message
//! to agent `A` is published to `<prefix>.A` and acknowledged by the server before `send`
//! returns (so it survives a crash of either side); `drain(A)` reads `A`'s durable pull
//! consumer without waiting and acknowledges what it took, which removes it from the stream.
//! `forget(A)` deletes the consumer when the run ends.

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// A message on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusMessage {
    pub from: String,
    pub text: String,
}

/// Carries messages between agents.
#[async_trait]
pub trait Bus: Send + Sync {
    async fn send(&self, to: &str, m: BusMessage) -> Result<(), String>;
    /// Takes every message waiting for `agent`, oldest first.
    async fn drain(&self, agent: &str) -> Vec<BusMessage>;
    /// Drops what the bus keeps for `agent` (its run ended).
    async fn forget(&self, _agent: &str) {}
}

/// Which bus an agent runtime uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BusConfig {
    /// In-process (one server).
    #[default]
    Local,
    /// NATS with JetStream (several servers).
    Nats {
        /// e.g. `nats://127.0.0.1:4222`.
        url: String,
        /// Subject prefix (default `kiln.agents`).
        #[serde(default)]
        subject_prefix: Option<String>,
        /// JetStream stream name (default `KILN_AGENT_BUS`).
        #[serde(default)]
        stream: Option<String>,
    },
}

impl BusConfig {
    /// The bus this config names (NATS connects on first use).
    pub fn build(&self) -> std::sync::Arc<dyn Bus> {
        match self {
            BusConfig::Local => std::sync::Arc::new(LocalBus::default()),
            BusConfig::Nats {
                url,
                subject_prefix,
                stream,
            } => std::sync::Arc::new(NatsBus::new(
                url,
                subject_prefix.as_deref().unwrap_or("kiln.agents"),
                stream.as_deref().unwrap_or("KILN_AGENT_BUS"),
            )),
        }
    }
}

/// The in-process bus.
#[derive(Default)]
pub struct LocalBus {
    boxes: StdMutex<HashMap<String, Vec<BusMessage>>>,
}

#[async_trait]
impl Bus for LocalBus {
    async fn send(&self, to: &str, m: BusMessage) -> Result<(), String> {
        self.boxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(to.to_string())
            .or_default()
            .push(m);
        Ok(())
    }
    async fn drain(&self, agent: &str) -> Vec<BusMessage> {
        self.boxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(agent)
            .unwrap_or_default()
    }
    async fn forget(&self, agent: &str) {
        self.boxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(agent);
    }
}

/// The NATS JetStream bus.
pub struct NatsBus {
    url: String,
    prefix: String,
    stream_name: String,
    stream: tokio::sync::OnceCell<async_nats::jetstream::stream::Stream>,
    js: tokio::sync::OnceCell<async_nats::jetstream::Context>,
}

/// Agent ids become subject tokens and consumer names: only `[A-Za-z0-9_-]`.
fn token(agent: &str) -> Result<&str, String> {
    if !agent.is_empty()
        && agent
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(agent)
    } else {
        Err(format!("`{agent}` is not an agent id"))
    }
}

impl NatsBus {
    pub fn new(url: &str, subject_prefix: &str, stream: &str) -> NatsBus {
        NatsBus {
            url: url.into(),
            prefix: subject_prefix.trim_end_matches('.').into(),
            stream_name: stream.into(),
            stream: tokio::sync::OnceCell::new(),
            js: tokio::sync::OnceCell::new(),
        }
    }

    async fn js(&self) -> Result<&async_nats::jetstream::Context, String> {
        self.js
            .get_or_try_init(|| async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(5))
                    .name("kiln-agents")
                    .connect(self.url.as_str())
                    .await
                    .map_err(|e| format!("cannot reach NATS at {}: {e}", self.url))?;
                Ok::<_, String>(async_nats::jetstream::new(client))
            })
            .await
    }

    async fn stream(&self) -> Result<&async_nats::jetstream::stream::Stream, String> {
        self.stream
            .get_or_try_init(|| async {
                use async_nats::jetstream::stream;
                self.js()
                    .await?
                    .get_or_create_stream(stream::Config {
                        name: self.stream_name.clone(),
                        subjects: vec![format!("{}.*", self.prefix)],
                        retention: stream::RetentionPolicy::WorkQueue,
                        storage: stream::StorageType::File,
                        max_age: Duration::from_secs(7 * 24 * 3600),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("NATS stream {}: {e}", self.stream_name))
            })
            .await
    }

    async fn try_drain(&self, agent: &str) -> Result<Vec<BusMessage>, String> {
        use async_nats::jetstream::consumer::{pull, AckPolicy};
        let agent = token(agent)?;
        let consumer = self
            .stream()
            .await?
            .get_or_create_consumer(
                agent,
                pull::Config {
                    durable_name: Some(agent.to_string()),
                    filter_subject: format!("{}.{agent}", self.prefix),
                    ack_policy: AckPolicy::Explicit,
                    // A consumer left by a run that never finished goes away by itself.
                    inactive_threshold: Duration::from_secs(24 * 3600),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("NATS consumer {agent}: {e}"))?;
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .messages()
            .await
            .map_err(|e| format!("NATS fetch for {agent}: {e}"))?;
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| format!("NATS fetch for {agent}: {e}"))?;
            match serde_json::from_slice::<BusMessage>(&m.payload) {
                Ok(b) => out.push(b),
                Err(e) => tracing::warn!(%agent, error = %e, "dropping a malformed bus message"),
            }
            m.double_ack()
                .await
                .map_err(|e| format!("NATS ack for {agent}: {e}"))?;
        }
        Ok(out)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn send(&self, to: &str, m: BusMessage) -> Result<(), String> {
        let to = token(to)?;
        self.stream().await?;
        let body = serde_json::to_vec(&m).map_err(|e| e.to_string())?;
        self.js()
            .await?
            .publish(format!("{}.{to}", self.prefix), body.into())
            .await
            .map_err(|e| format!("NATS publish to {to}: {e}"))?
            .await
            .map_err(|e| format!("NATS did not store the message to {to}: {e}"))?;
        Ok(())
    }

    async fn drain(&self, agent: &str) -> Vec<BusMessage> {
        match self.try_drain(agent).await {
            Ok(v) => v,
            Err(e) => {
                // Messages stay in the stream; the next step tries again.
                tracing::warn!(%agent, error = %e, "agent bus");
                Vec::new()
            }
        }
    }

    async fn forget(&self, agent: &str) {
        let Ok(agent) = token(agent) else { return };
        if let Ok(s) = self.stream().await {
            let _ = s.delete_consumer(agent).await;
        }
    }
}
