//! Per-key rate limits: GCRA (the generic cell rate algorithm, a token bucket kept as one
//! "theoretical arrival time" per key and bucket), with separate buckets for management calls,
//! sandbox creation and in-sandbox operations (exec, processes, files, PTY). Limits are per
//! organisation (server defaults unless the org sets its own).
//!
//! State is in memory, per server process: with several replicas each enforces the limit on
//! the requests it sees (documented in ARCHITECTURE.md).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::http::Method;
use kiln_protocol::api::{Rate, RateLimits};

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    Manage,
    Create,
    Sandbox,
}

impl Bucket {
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Manage => "manage",
            Bucket::Create => "create",
            Bucket::Sandbox => "sandbox",
        }
    }

    /// The bucket of a route (a matched pattern like `/v1/sandboxes/:id/exec`).
    pub fn of(method: &Method, route: &str) -> Bucket {
        if route == "/v1/sandboxes" && method == Method::POST {
            Bucket::Create
        } else if let Some(rest) = route.strip_prefix("/v1/sandboxes/:id/") {
            if rest == "pause" || rest == "resume" {
                Bucket::Manage
            } else {
                Bucket::Sandbox
            }
        } else {
            Bucket::Manage
        }
    }

    pub fn rate(self, l: &RateLimits) -> Rate {
        match self {
            Bucket::Manage => l.manage,
            Bucket::Create => l.create,
            Bucket::Sandbox => l.sandbox,
        }
    }
}

/// The server defaults.
pub fn default_limits() -> RateLimits {
    RateLimits {
        manage: Rate {
            per_sec: 1000.0,
            burst: 2000,
        },
        create: Rate {
            per_sec: 100.0,
            burst: 200,
        },
        sandbox: Rate {
            per_sec: 1000.0,
            burst: 2000,
        },
    }
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket size (`RateLimit-Limit`).
    pub limit: u32,
    /// Requests left right now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Seconds until the bucket is full again (`RateLimit-Reset`).
    pub reset_secs: u64,
    /// Seconds to wait before a retry can succeed (`Retry-After`, when refused).
    pub retry_after_secs: u64,
}

/// GCRA state for every (key, bucket).
pub struct Limiter {
    start: Instant,
    tat: Mutex<HashMap<(String, Bucket), f64>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            tat: Mutex::new(HashMap::new()),
        }
    }
}

impl Limiter {
    /// Takes one request from `key`'s `bucket` at `rate`.
    pub fn check(&self, key: &str, bucket: Bucket, rate: Rate) -> Decision {
        let now = self.start.elapsed().as_secs_f64();
        self.check_at(key, bucket, rate, now)
    }

    fn check_at(&self, key: &str, bucket: Bucket, rate: Rate, now: f64) -> Decision {
        let burst = rate.burst.max(1);
        if !(rate.per_sec.is_finite() && rate.per_sec > 0.0) {
            return Decision {
                allowed: false,
                limit: burst,
                remaining: 0,
                reset_secs: 0,
                retry_after_secs: 3600,
            };
        }
        let t = 1.0 / rate.per_sec; // emission interval
        let tau = t * burst as f64; // bucket depth in time
        let mut map = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            // Drop cells that are full again (they carry no information).
            map.retain(|_, tat| *tat > now);
        }
        let cell = map.entry((key.to_string(), bucket)).or_insert(now);
        let tat = cell.max(now);
        let new_tat = tat + t;
        if new_tat - now > tau + 1e-9 {
            let wait = new_tat - tau - now;
            return Decision {
                allowed: false,
                limit: burst,
                remaining: 0,
                reset_secs: (tat - now).ceil() as u64,
                retry_after_secs: wait.ceil().max(1.0) as u64,
            };
        }
        *cell = new_tat;
        let remaining = ((tau - (new_tat - now)) / t + 1e-9).floor().max(0.0) as u32;
        Decision {
            allowed: true,
            limit: burst,
            remaining,
            reset_secs: (new_tat - now).ceil() as u64,
            retry_after_secs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_a_burst_then_the_rate() {
        let l = Limiter::default();
        let rate = Rate {
            per_sec: 2.0,
            burst: 3,
        };
        let mut out = Vec::new();
        // Three at once pass, the fourth waits; half a second later one more passes.
        for now in [0.0, 0.0, 0.0, 0.0, 0.5, 0.5] {
            let d = l.check_at("k", Bucket::Manage, rate, now);
            out.push(format!(
                "t={now} allowed={} remaining={} reset={} retry_after={}",
                d.allowed, d.remaining, d.reset_secs, d.retry_after_secs
            ));
        }
        // Another key and another bucket are independent.
        assert!(l.check_at("k2", Bucket::Manage, rate, 0.5).allowed);
        assert!(l.check_at("k", Bucket::Create, rate, 0.5).allowed);
        expect_test::expect![[r#"
            [
                "t=0 allowed=true remaining=2 reset=1 retry_after=0",
                "t=0 allowed=true remaining=1 reset=1 retry_after=0",
                "t=0 allowed=true remaining=0 reset=2 retry_after=0",
                "t=0 allowed=false remaining=0 reset=2 retry_after=1",
                "t=0.5 allowed=true remaining=0 reset=2 retry_after=0",
                "t=0.5 allowed=false remaining=0 reset=2 retry_after=1",
            ]
        "#]]
        .assert_debug_eq(&out);
    }

    #[test]
    fn routes_map_to_buckets() {
        let cases = [
            (Method::POST, "/v1/sandboxes", Bucket::Create),
            (Method::GET, "/v1/sandboxes", Bucket::Manage),
            (Method::POST, "/v1/sandboxes/:id/exec", Bucket::Sandbox),
            (Method::GET, "/v1/sandboxes/:id/files", Bucket::Sandbox),
            (Method::POST, "/v1/sandboxes/:id/pause", Bucket::Manage),
            (Method::GET, "/v1/keys", Bucket::Manage),
        ];
        for (m, r, b) in cases {
            assert_eq!(Bucket::of(&m, r), b, "{m} {r}");
        }
    }
}
