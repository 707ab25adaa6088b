//! Egress allow-lists for `full` sandboxes: which destinations a sandbox may reach, enforced
//! on the host with nftables, plus the DNS forwarder that lets domain names into the list.
//!
//! How it works: the `inet kiln` table has one verdict map per bridge, keyed by a sandbox's
//! source address (sandboxes cannot change their address or forge packets: no `NET_ADMIN`,
//! no `NET_RAW`). An allow-listed sandbox has an entry there that jumps to its own chain,
//! `eg_<id>`, from both the forward hook (traffic leaving through the host) and the input
//! hook (traffic to the host itself). That chain accepts replies, DNS to the gateway, the
//! CIDRs of the list (set `c_<id>`, intervals) and the addresses that the DNS forwarder
//! learned for allowed names (set `d_<id>`, entries expire with the record's TTL); anything
//! else is counted (`deny_<id>`), logged to the kernel log (rate-limited, prefix
//! `kiln-egress-deny`) and rejected at once: a TCP reset, or ICMP administratively
//! prohibited for other protocols, so clients fail fast instead of timing out.
//!
//! The DNS forwarder listens on the bridge's gateway address, port 53, and is every `full`
//! sandbox's name server. For a sandbox with an allow-list it answers only names the list
//! allows (others get `REFUSED`) and adds the A records of each answer to that sandbox's set
//! before replying, so the first connection to a freshly resolved name already passes.
//!
//! What it does not do: IPv6 (sandboxes only get IPv4), or SNI/Host inspection (a name is
//! allowed at resolution time; two names sharing one address are both reachable once either
//! resolves).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::error::{Result, SandboxError};

/// Most entries an allow-list may have (domains plus CIDRs).
pub const MAX_RULES: usize = 256;

/// Shortest and longest time a learned address stays allowed (the record's TTL, clamped).
const MIN_LEARN_SECS: u32 = 60;
const MAX_LEARN_SECS: u32 = 3600;

/// Destinations a sandbox may reach. Empty = nothing but DNS.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EgressAllow {
    /// Exact names (`pypi.org`) or wildcard suffixes (`*.github.com`, which also matches
    /// `github.com` itself), lower-case, without a trailing dot.
    #[serde(default)]
    pub domains: Vec<String>,
    /// IPv4 networks as `a.b.c.d/len` (a bare address means `/32`).
    #[serde(default)]
    pub cidrs: Vec<String>,
}

impl EgressAllow {
    /// Checks and normalises every entry.
    pub fn normalized(&self) -> Result<EgressAllow> {
        if self.domains.len() + self.cidrs.len() > MAX_RULES {
            return Err(SandboxError::InvalidSpec(format!(
                "an egress allow-list has at most {MAX_RULES} entries"
            )));
        }
        let mut domains = Vec::new();
        for d in &self.domains {
            domains.push(normalize_domain(d)?);
        }
        let mut cidrs = Vec::new();
        for c in &self.cidrs {
            let (a, l) = parse_cidr(c)?;
            cidrs.push(format!("{a}/{l}"));
        }
        domains.sort();
        domains.dedup();
        cidrs.sort();
        cidrs.dedup();
        Ok(EgressAllow { domains, cidrs })
    }

    /// Whether DNS name `name` (any case, optional trailing dot) is allowed.
    pub fn allows_name(&self, name: &str) -> bool {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        self.domains.iter().any(|d| match d.strip_prefix("*.") {
            Some(suffix) => n == suffix || n.ends_with(&format!(".{suffix}")),
            None => n == *d,
        })
    }
}

fn normalize_domain(d: &str) -> Result<String> {
    let bad = || {
        SandboxError::InvalidSpec(format!(
            "egress domain {d:?} is not a host name (e.g. `pypi.org` or `*.github.com`)"
        ))
    };
    let s = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let body = s.strip_prefix("*.").unwrap_or(&s);
    if body.is_empty() || body.len() > 253 || !body.contains('.') && body.len() < 2 {
        return Err(bad());
    }
    for label in body.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad());
        }
    }
    Ok(s)
}

/// Parses `a.b.c.d[/len]` into its network address and prefix length.
pub fn parse_cidr(c: &str) -> Result<(Ipv4Addr, u8)> {
    let bad = || {
        SandboxError::InvalidSpec(format!(
            "egress CIDR {c:?} is not an IPv4 network (e.g. `10.0.0.0/8` or `192.0.2.7`)"
        ))
    };
    let (a, l) = match c.trim().split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().map_err(|_| bad())?),
        None => (c.trim(), 32),
    };
    let a: Ipv4Addr = a.parse().map_err(|_| bad())?;
    if l > 32 {
        return Err(bad());
    }
    let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
    Ok((Ipv4Addr::from(u32::from(a) & mask), l))
}

/// nftables-safe suffix for a sandbox's objects.
fn obj(id: &str) -> String {
    id.replace('-', "_")
}

/// The per-bridge part (map and input chain), added to [`crate::linux::nat_script`].
pub fn base_script(b: &str, bridge: &str) -> String {
    format!(
        "add map inet kiln egress_{b} {{ type ipv4_addr : verdict; }}\n\
         add chain inet kiln in_{b} {{ type filter hook input priority filter; policy accept; }}\n\
         flush chain inet kiln in_{b}\n\
         add rule inet kiln in_{b} iifname \"{bridge}\" ip saddr vmap @egress_{b}\n"
    )
}

/// Installs (or replaces) sandbox `id`'s allow-list; `addr` is its address, `gateway` the
/// bridge's. Idempotent.
pub fn apply_script(
    b: &str,
    id: &str,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    allow: &EgressAllow,
) -> String {
    let n = obj(id);
    let mut s = format!(
        "add set inet kiln c_{n} {{ type ipv4_addr; flags interval; }}\n\
         add set inet kiln d_{n} {{ type ipv4_addr; flags timeout; }}\n\
         add counter inet kiln deny_{n}\n\
         add chain inet kiln eg_{n}\n\
         flush chain inet kiln eg_{n}\n\
         flush set inet kiln c_{n}\n"
    );
    if !allow.cidrs.is_empty() {
        s.push_str(&format!(
            "add element inet kiln c_{n} {{ {} }}\n",
            allow.cidrs.join(", ")
        ));
    }
    s.push_str(&format!(
        "add rule inet kiln eg_{n} ct state established,related accept\n\
         add rule inet kiln eg_{n} ip daddr {gateway} udp dport 53 accept\n\
         add rule inet kiln eg_{n} ip daddr {gateway} tcp dport 53 accept\n\
         add rule inet kiln eg_{n} ip daddr @c_{n} accept\n\
         add rule inet kiln eg_{n} ip daddr @d_{n} accept\n\
         add rule inet kiln eg_{n} counter name deny_{n}\n\
         add rule inet kiln eg_{n} limit rate 10/second burst 20 packets log prefix \"kiln-egress-deny {id} \" level info\n\
         add rule inet kiln eg_{n} meta l4proto tcp reject with tcp reset\n\
         add rule inet kiln eg_{n} reject with icmpx admin-prohibited\n\
         add element inet kiln egress_{b} {{ {addr} : jump eg_{n} }}\n"
    ));
    s
}

/// Removes sandbox `id`'s allow-list. Idempotent: nft 1.0.6 has no `destroy`, so every
/// object is (re)added first and then deleted in the same transaction.
pub fn remove_script(b: &str, id: &str, addr: Ipv4Addr) -> String {
    let n = obj(id);
    format!(
        "add chain inet kiln eg_{n}\n\
         add set inet kiln c_{n} {{ type ipv4_addr; flags interval; }}\n\
         add set inet kiln d_{n} {{ type ipv4_addr; flags timeout; }}\n\
         add counter inet kiln deny_{n}\n\
         add element inet kiln egress_{b} {{ {addr} : jump eg_{n} }}\n\
         delete element inet kiln egress_{b} {{ {addr} }}\n\
         delete chain inet kiln eg_{n}\n\
         delete set inet kiln c_{n}\n\
         delete set inet kiln d_{n}\n\
         delete counter inet kiln deny_{n}\n"
    )
}

/// Adds addresses learned from DNS to sandbox `id`'s set for `secs` seconds.
pub fn learn_script(id: &str, addrs: &[Ipv4Addr], secs: u32) -> String {
    let n = obj(id);
    let elems: Vec<String> = addrs
        .iter()
        .map(|a| format!("{a} timeout {secs}s"))
        .collect();
    format!("add element inet kiln d_{n} {{ {} }}\n", elems.join(", "))
}

/// Runs an nft script as one transaction.
pub fn nft(script: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Packets denied so far for sandbox `id` (its nft counter), `None` without an allow-list.
pub fn denied_packets(id: &str) -> Option<u64> {
    let out = std::process::Command::new("nft")
        .args([
            "list",
            "counter",
            "inet",
            "kiln",
            &format!("deny_{}", obj(id)),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let i = text.find("packets ")?;
    text[i + 8..].split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// DNS messages (RFC 1035), just enough to read a question and the A records of an answer.

/// The first question of a DNS message: (name, qtype).
pub fn dns_question(msg: &[u8]) -> Option<(String, u16)> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) == 0 {
        return None;
    }
    let (name, end) = read_name(msg, 12)?;
    let qtype = u16::from_be_bytes([*msg.get(end)?, *msg.get(end + 1)?]);
    Some((name, qtype))
}

/// Reads a (possibly compressed) name at `pos`; returns it and the offset after it.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *msg.get(pos)? as usize;
        if len == 0 {
            return Some((labels.join("."), end.unwrap_or(pos + 1)));
        }
        if len & 0xc0 == 0xc0 {
            let ptr = ((len & 0x3f) << 8) | *msg.get(pos + 1)? as usize;
            end.get_or_insert(pos + 2);
            pos = ptr;
            continue;
        }
        let label = msg.get(pos + 1..pos + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        pos += 1 + len;
    }
    None
}

/// The A records of a response, with the smallest TTL among them.
pub fn dns_answers(msg: &[u8]) -> (Vec<Ipv4Addr>, u32) {
    let mut out = Vec::new();
    let mut ttl = u32::MAX;
    let mut parse = || -> Option<()> {
        let qd = u16::from_be_bytes([msg[4], msg[5]]) as usize;
        let an = u16::from_be_bytes([msg[6], msg[7]]) as usize;
        let mut pos = 12;
        for _ in 0..qd {
            pos = read_name(msg, pos)?.1 + 4;
        }
        for _ in 0..an {
            pos = read_name(msg, pos)?.1;
            let h = msg.get(pos..pos + 10)?;
            let typ = u16::from_be_bytes([h[0], h[1]]);
            let class = u16::from_be_bytes([h[2], h[3]]);
            let t = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            let rdlen = u16::from_be_bytes([h[8], h[9]]) as usize;
            let data = msg.get(pos + 10..pos + 10 + rdlen)?;
            if typ == 1 && class == 1 && rdlen == 4 {
                out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
                ttl = ttl.min(t);
            }
            pos += 10 + rdlen;
        }
        Some(())
    };
    if msg.len() >= 12 {
        let _ = parse();
    }
    (out, ttl)
}

/// A reply to `query` with response code `rcode` (5 = REFUSED) and no records.
pub fn dns_error_reply(query: &[u8], rcode: u8) -> Vec<u8> {
    let mut r = query.to_vec();
    if r.len() >= 12 {
        r[2] = 0x80 | (query[2] & 0x79); // QR, keep opcode and RD
        r[3] = 0x80 | (rcode & 0x0f); // RA
        for b in &mut r[6..12] {
            *b = 0; // no answer, authority or additional records
        }
        // Keep the question section only.
        if let Some((_, end)) = read_name(query, 12) {
            r.truncate((end + 4).min(r.len()));
        }
    }
    r
}

/// Where the forwarder finds allow-lists: on disk, so that any Kiln server's forwarder on a
/// bridge can serve every sandbox on it and a restart loses nothing. A sandbox's address
/// lease (`<lease_dir>/<ip>`, holding its runtime's run dir and its id) leads to
/// `<run_dir>/.egress/<id>.json`; no such file = unrestricted.
#[derive(Debug, Clone)]
pub struct Policies {
    pub lease_dir: std::path::PathBuf,
}

impl Policies {
    /// The file holding sandbox `id`'s allow-list under `run_dir`.
    pub fn file(run_dir: &std::path::Path, id: &str) -> std::path::PathBuf {
        run_dir.join(".egress").join(format!("{id}.json"))
    }

    /// Writes (atomically) or removes sandbox `id`'s allow-list.
    pub fn store(
        run_dir: &std::path::Path,
        id: &str,
        allow: Option<&EgressAllow>,
    ) -> std::io::Result<()> {
        let path = Self::file(run_dir, id);
        match allow {
            Some(a) => {
                let dir = run_dir.join(".egress");
                std::fs::create_dir_all(&dir)?;
                let tmp = dir.join(format!(".{id}.tmp"));
                std::fs::write(&tmp, serde_json::to_vec(a).map_err(std::io::Error::other)?)?;
                std::fs::rename(&tmp, &path)
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// The sandbox at `addr` and its allow-list, if it has one.
    pub fn lookup(&self, addr: Ipv4Addr) -> Option<(String, EgressAllow)> {
        let lease = std::fs::read_to_string(self.lease_dir.join(addr.to_string())).ok()?;
        let mut lines = lease.lines();
        let run_dir = std::path::PathBuf::from(lines.next()?);
        let id = lines.next()?.to_string();
        let allow = serde_json::from_slice(&std::fs::read(Self::file(&run_dir, &id)).ok()?).ok()?;
        Some((id, allow))
    }
}

/// A UDP socket bound with `SO_REUSEPORT`, so every Kiln server on a bridge can run a
/// forwarder on its gateway (the kernel spreads queries among them; any one can answer any
/// sandbox, see [`Policies`]).
fn reuseport_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    // SAFETY: plain socket calls on a descriptor we own; closed on every error path.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = std::net::UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(sock)
    }
}

/// The DNS forwarder on `listen` (the gateway, port 53), relaying to `upstream`.
pub struct DnsForwarder {
    pub listen: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsForwarder {
    /// Binds (with `SO_REUSEPORT`) and starts serving UDP.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        policies: Policies,
    ) -> std::io::Result<DnsForwarder> {
        let sock = Arc::new(tokio::net::UdpSocket::from_std(reuseport_udp(listen)?)?);
        let listen = sock.local_addr()?;
        info!(%listen, %upstream, "egress DNS forwarder listening");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = match sock.recv_from(&mut buf).await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("dns forwarder: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let query = buf[..n].to_vec();
                let sock = sock.clone();
                let policies = policies.clone();
                tokio::spawn(async move {
                    if let Some(reply) = answer(&query, peer, upstream, &policies).await {
                        let _ = sock.send_to(&reply, peer).await;
                    }
                });
            }
        });
        Ok(DnsForwarder { listen, task })
    }
}

async fn answer(
    query: &[u8],
    peer: SocketAddr,
    upstream: SocketAddr,
    policies: &Policies,
) -> Option<Vec<u8>> {
    let (name, _qtype) = dns_question(query)?;
    let policy = match peer.ip() {
        std::net::IpAddr::V4(a) => {
            let p = policies.clone();
            tokio::task::spawn_blocking(move || p.lookup(a))
                .await
                .ok()
                .flatten()
        }
        _ => None,
    };
    if let Some((id, allow)) = &policy {
        if !allow.allows_name(&name) {
            info!(sandbox = %id, %name, "egress: name refused");
            return Some(dns_error_reply(query, 5));
        }
    }
    let up = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok()?;
    up.send_to(query, upstream).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(Duration::from_secs(5), up.recv(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => return Some(dns_error_reply(query, 2)), // SERVFAIL
    };
    buf.truncate(n);
    if let Some((id, _)) = policy {
        let (addrs, ttl) = dns_answers(&buf);
        if !addrs.is_empty() {
            let secs = ttl.clamp(MIN_LEARN_SECS, MAX_LEARN_SECS);
            let script = learn_script(&id, &addrs, secs);
            let res = tokio::task::spawn_blocking(move || nft(&script)).await;
            match res {
                Ok(Ok(())) => debug!(sandbox = %id, %name, ?addrs, secs, "egress: learned"),
                Ok(Err(e)) => warn!(sandbox = %id, "egress: cannot allow {addrs:?}: {e}"),
                Err(e) => warn!("egress task: {e}"),
            }
        }
    }
    Some(buf)
}

/// The name server the forwarder relays to: the first non-loopback IPv4 one of a resolv.conf,
/// else the first loopback one (reachable from the host, where the forwarder runs).
pub fn upstream_from_resolv(text: &str) -> Option<SocketAddr> {
    let mut loopback = None;
    for line in text.lines() {
        let Some(a) = line.trim().strip_prefix("nameserver") else {
            continue;
        };
        if let Ok(ip) = a.trim().parse::<Ipv4Addr>() {
            if ip.is_loopback() {
                loopback.get_or_insert(ip);
            } else {
                return Some(SocketAddr::from((ip, 53)));
            }
        }
    }
    loopback.map(|ip| SocketAddr::from((ip, 53)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_are_validated_and_matched() {
        let a = EgressAllow {
            domains: vec!["PyPI.org.".into(), "*.github.com".into(), "pypi.org".into()],
            cidrs: vec!["10.1.2.3/8".into(), "192.0.2.7".into()],
        }
        .normalized()
        .expect("valid");
        assert_eq!(a.domains, vec!["*.github.com", "pypi.org"]);
        assert_eq!(a.cidrs, vec!["10.0.0.0/8", "192.0.2.7/32"]);
        assert!(a.allows_name("pypi.org."));
        assert!(a.allows_name("github.com"));
        assert!(a.allows_name("codeload.GitHub.com"));
        assert!(!a.allows_name("evilgithub.com"));
        assert!(!a.allows_name("files.pythonhosted.org"));
        for bad in ["", "*.", "a..b", "-x.com", "x y.com", "ex ample"] {
            let e = EgressAllow {
                domains: vec![bad.into()],
                cidrs: vec![],
            };
            assert!(e.normalized().is_err(), "{bad:?}");
        }
        for bad in ["10.0.0.0/33", "300.1.1.1", "1.2.3.4/x", "::1/128"] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nft_scripts() {
        let allow = EgressAllow {
            domains: vec!["pypi.org".into()],
            cidrs: vec!["10.0.0.0/8".into()],
        };
        let ip = Ipv4Addr::new(10, 201, 0, 5);
        let gw = Ipv4Addr::new(10, 201, 0, 1);
        expect_test::expect![[r#"
            add set inet kiln c_sb_1 { type ipv4_addr; flags interval; }
            add set inet kiln d_sb_1 { type ipv4_addr; flags timeout; }
            add counter inet kiln deny_sb_1
            add chain inet kiln eg_sb_1
            flush chain inet kiln eg_sb_1
            flush set inet kiln c_sb_1
            add element inet kiln c_sb_1 { 10.0.0.0/8 }
            add rule inet kiln eg_sb_1 ct state established,related accept
            add rule inet kiln eg_sb_1 ip daddr 10.201.0.1 udp dport 53 accept
            add rule inet kiln eg_sb_1 ip daddr 10.201.0.1 tcp dport 53 accept
            add rule inet kiln eg_sb_1 ip daddr @c_sb_1 accept
            add rule inet kiln eg_sb_1 ip daddr @d_sb_1 accept
            add rule inet kiln eg_sb_1 counter name deny_sb_1
            add rule inet kiln eg_sb_1 limit rate 10/second burst 20 packets log prefix "kiln-egress-deny sb-1 " level info
            add rule inet kiln eg_sb_1 meta l4proto tcp reject with tcp reset
            add rule inet kiln eg_sb_1 reject with icmpx admin-prohibited
            add element inet kiln egress_kiln0 { 10.201.0.5 : jump eg_sb_1 }
        "#]]
        .assert_eq(&apply_script("kiln0", "sb-1", ip, gw, &allow));
        expect_test::expect![[r#"
            add chain inet kiln eg_sb_1
            add set inet kiln c_sb_1 { type ipv4_addr; flags interval; }
            add set inet kiln d_sb_1 { type ipv4_addr; flags timeout; }
            add counter inet kiln deny_sb_1
            add element inet kiln egress_kiln0 { 10.201.0.5 : jump eg_sb_1 }
            delete element inet kiln egress_kiln0 { 10.201.0.5 }
            delete chain inet kiln eg_sb_1
            delete set inet kiln c_sb_1
            delete set inet kiln d_sb_1
            delete counter inet kiln deny_sb_1
        "#]]
        .assert_eq(&remove_script("kiln0", "sb-1", ip));
        assert_eq!(
            learn_script("sb-1", &[Ipv4Addr::new(1, 2, 3, 4)], 60),
            "add element inet kiln d_sb_1 { 1.2.3.4 timeout 60s }\n"
        );
    }

    /// A query for `pypi.org` A, and a response with a CNAME and two A records (the second
    /// name compressed).
    fn query() -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x04pypi\x03org\x00\x00\x01\x00\x01");
        q
    }

    #[test]
    fn dns_parsing() {
        let q = query();
        assert_eq!(dns_question(&q), Some(("pypi.org".into(), 1)));
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 3; // three answers
                  // CNAME pypi.org -> x.pypi.org (not an address)
        r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 4]);
        r.extend_from_slice(b"\x01x\xc0\x0c");
        // A 151.101.0.223 ttl 300, A 151.101.64.223 ttl 120
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 151, 101, 0, 223]);
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 120, 0, 4, 151, 101, 64, 223]);
        let (addrs, ttl) = dns_answers(&r);
        assert_eq!(
            addrs,
            vec![
                Ipv4Addr::new(151, 101, 0, 223),
                Ipv4Addr::new(151, 101, 64, 223)
            ]
        );
        assert_eq!(ttl, 120);
        let refused = dns_error_reply(&q, 5);
        assert_eq!(refused.len(), q.len());
        assert_eq!(refused[2] & 0x80, 0x80, "a response");
        assert_eq!(refused[3] & 0x0f, 5, "REFUSED");
        assert_eq!(dns_question(&refused), Some(("pypi.org".into(), 1)));
        // Garbage never panics.
        for n in 0..q.len() {
            let _ = dns_question(&q[..n]);
            let _ = dns_answers(&r[..n.min(r.len())]);
        }
        assert!(dns_answers(&[0u8; 3]).0.is_empty());
    }

    #[test]
    fn upstream_choice() {
        assert_eq!(
            upstream_from_resolv("nameserver 127.0.0.53\nnameserver 10.255.255.53\n"),
            Some("10.255.255.53:53".parse().expect("addr"))
        );
        assert_eq!(
            upstream_from_resolv("nameserver 127.0.0.53\n"),
            Some("127.0.0.53:53".parse().expect("addr"))
        );
        assert_eq!(upstream_from_resolv("search x\n"), None);
    }
}
