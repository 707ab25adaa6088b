//! Listening TCP ports inside the sandbox (from `/proc/net/tcp{,6}`, with the owning process
//! found through `/proc/*/fd`), and `Connect`: a raw pipe between a kilnd connection and a
//! TCP connection in the sandbox's network namespace.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use kiln_protocol::kilnd::{DaemonError, DaemonErrorCode, ListenPort};

use super::files::err;

/// `(address, port, socket inode)` of every LISTEN socket in a `/proc/net/tcp` or `tcp6` text.
pub fn parse_proc_net_tcp(text: &str, v6: bool) -> Vec<(String, u16, u64)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((addr_hex, port_hex)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port_hex, 16) else {
            continue;
        };
        let Some(address) = parse_addr(addr_hex, v6) else {
            continue;
        };
        let inode = f[9].parse().unwrap_or(0);
        out.push((address, port, inode));
    }
    out
}

/// The kernel prints an address as 32-bit words in hex, each the address bytes read as a
/// native-endian integer.
fn parse_addr(hex: &str, v6: bool) -> Option<String> {
    if hex.len() != if v6 { 32 } else { 8 } {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    for i in 0..hex.len() / 8 {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    if !v6 {
        return Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string());
    }
    let arr: [u8; 16] = bytes.try_into().ok()?;
    let ip = Ipv6Addr::from(arr);
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => ip.to_string(),
    })
}

/// Socket inode -> (pid, comm) for every process kilnd can see.
fn socket_owners() -> HashMap<u64, (u32, String)> {
    let mut owners = HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            {
                let c = comm.get_or_insert_with(|| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default()
                });
                owners.entry(inode).or_insert((pid, c.clone()));
            }
        }
    }
    owners
}

/// Every listening TCP port, sorted, one entry per (port, address).
pub fn list() -> Result<Vec<ListenPort>, DaemonError> {
    let mut socks = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        match std::fs::read_to_string(file) {
            Ok(text) => socks.extend(parse_proc_net_tcp(&text, v6)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(err(
                    DaemonErrorCode::Internal,
                    format!("reading {file}: {e}"),
                ))
            }
        }
    }
    let owners = if socks.is_empty() {
        HashMap::new()
    } else {
        socket_owners()
    };
    let mut ports: Vec<ListenPort> = socks
        .into_iter()
        .map(|(address, port, inode)| {
            let owner = owners.get(&inode);
            ListenPort {
                port,
                address,
                pid: owner.map(|o| o.0),
                command: owner.map(|o| o.1.clone()),
            }
        })
        .collect();
    ports.sort();
    ports.dedup_by(|a, b| a.port == b.port && a.address == b.address);
    Ok(ports)
}

/// Connects to `host:port` inside the sandbox (5 s limit).
pub async fn connect(host: &str, port: u16) -> Result<tokio::net::TcpStream, DaemonError> {
    if port == 0 {
        return Err(err(DaemonErrorCode::Invalid, "port 0 is not a port"));
    }
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(err(
            DaemonErrorCode::NotFound,
            format!("nothing listens on {host}:{port} in the sandbox"),
        )),
        Ok(Err(e)) => Err(err(
            DaemonErrorCode::Internal,
            format!("connecting to {host}:{port}: {e}"),
        )),
        Err(_) => Err(err(
            DaemonErrorCode::Internal,
            format!("connecting to {host}:{port} timed out"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_parsing() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:A2C4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            parse_proc_net_tcp(v4, false),
            vec![
                ("0.0.0.0".to_string(), 8080, 1234),
                ("127.0.0.1".to_string(), 53, 99)
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n\
   1: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 78 1 0000000000000000 100 0 0 10 0\n\
   2: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 79 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_proc_net_tcp(v6, true),
            vec![
                ("::".to_string(), 8081, 77),
                ("::1".to_string(), 22, 78),
                ("127.0.0.1".to_string(), 8082, 79)
            ]
        );
        assert!(parse_proc_net_tcp("header\ngarbage line\n1: zz:zz 0 0A", false).is_empty());
    }
}
