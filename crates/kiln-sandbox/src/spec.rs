//! Generation of each sandbox's OCI `config.json` (pure: no I/O), plus the small per-sandbox
//! `/etc` files.
//!
//! # Security decisions
//! * **Namespaces**: pid, mount, network, uts, ipc and cgroup. The network namespace is
//!   created by the OCI runtime (loopback only; for `full` the host moves a veth in after
//!   start), or, without a user namespace, pre-created by Kiln and joined by path.
//! * **User namespace** (when [`crate::RuntimeConfig::userns`] is set): container ids
//!   0..size map to host ids from `host_base`. runc 1.1.5 cannot id-map an overlay rootfs
//!   (that needs runc 1.2), so the layers are uid-shifted copies ([`crate::userns`]). Without
//!   one, a sandbox's root is host uid 0 restrained by everything below.
//! * **Capabilities** (bounding = effective = permitted; ambient and inheritable empty):
//!   [`CAPABILITIES`]. Notably absent: `NET_RAW`, `NET_ADMIN`, `SYS_ADMIN`, `SYS_MODULE`,
//!   `SYS_PTRACE`, `SYS_TIME`, `SYS_BOOT`, `SYS_RAWIO`, `SYS_RESOURCE`, `MKNOD`,
//!   `AUDIT_CONTROL`, `MAC_ADMIN`, `MAC_OVERRIDE`, `DAC_READ_SEARCH`, `BPF`, `PERFMON`.
//! * **Files shared with the host**: kilnd (read-only bind), `run_dir/<id>` at `/.kiln/run`
//!   (read-write: kilnd creates its socket there; tmpfs pages written there are charged to the
//!   sandbox's memory cgroup), and `/etc/{hosts,hostname,resolv.conf}` which live *inside* the
//!   sandbox's quota-limited volume so writing to them cannot fill the host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_protocol::api::NetworkMode;
use kiln_protocol::kilnd::{KILND_PATH_IN_SANDBOX, SOCKET_DIR_IN_SANDBOX, SOCKET_NAME};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilities, LinuxCpu, LinuxDeviceCgroup, LinuxDeviceType,
    LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceType, LinuxPids, LinuxResources, Mount,
    PosixRlimitBuilder, PosixRlimitType, Process, Root, Spec, User,
};

use crate::config::SandboxSpec;
use crate::error::{Result, SandboxError};

/// CPU bandwidth period (µs).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Size of `/dev/shm`.
pub const SHM_SIZE: &str = "65536k";
/// Environment every sandbox starts with (before `SandboxSpec::env`, which overrides it).
pub const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "xterm-256color"),
];

/// The capabilities a sandbox keeps (bounding, effective and permitted sets).
pub const CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::AuditWrite,
    Capability::Setfcap,
];

/// Paths hidden from the sandbox (runc's `runc spec` defaults plus powercap).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths made read-only (runc's defaults).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Character devices the device cgroup allows: (major, minor or None = any, access).
const ALLOWED_DEVICES: &[(i64, Option<i64>, &str)] = &[
    (1, Some(3), "rwm"), // null
    (1, Some(5), "rwm"), // zero
    (1, Some(7), "rwm"), // full
    (1, Some(8), "rwm"), // random
    (1, Some(9), "rwm"), // urandom
    (5, Some(0), "rwm"), // tty
    (5, Some(1), "rwm"), // console
    (5, Some(2), "rwm"), // ptmx
    (136, None, "rwm"),  // pts/*
];

fn id_mappings(m: Option<crate::config::IdMap>) -> Vec<oci_spec::runtime::LinuxIdMapping> {
    m.into_iter()
        .filter_map(|m| {
            oci_spec::runtime::LinuxIdMappingBuilder::default()
                .container_id(0u32)
                .host_id(m.host_base)
                .size(m.size)
                .build()
                .ok()
        })
        .collect()
}

/// Host-side inputs of [`oci_config`] besides the spec itself.
#[derive(Debug, Clone)]
pub struct BundleInputs<'a> {
    pub spec: &'a SandboxSpec,
    /// Absolute cgroup path, e.g. `/kiln/1a2b3c4d/sb-1`.
    pub cgroups_path: String,
    pub kilnd_host_path: &'a Path,
    /// Host directory bind-mounted at `/.kiln/run`.
    pub run_dir_host: &'a Path,
    /// Host directory holding the generated `hosts`, `hostname`, `resolv.conf`.
    pub etc_dir_host: &'a Path,
    /// Pre-created network namespace to join (`full` networking without a user namespace);
    /// `None` = runc creates one (inside the user namespace, if any).
    pub netns_path: Option<&'a Path>,
    /// `RLIMIT_NOFILE` (soft = hard) of the sandbox's init; must not exceed the server's own
    /// hard limit unless it holds `CAP_SYS_RESOURCE` (see [`nofile_limit`]).
    pub nofile: u64,
    /// User namespace mapping, if this sandbox runs in one. Requires `netns_path == None`:
    /// sysfs can only be mounted by the user namespace that owns the netns, so runc must
    /// create the netns inside it (the host wires `full` networking up afterwards).
    pub userns: Option<crate::config::IdMap>,
}

/// Default `RLIMIT_NOFILE` of sandboxes.
pub const NOFILE: u64 = 65536;

/// [`NOFILE`], lowered to this process's hard limit when it could not raise it (runc sets the
/// limit with the server's privileges).
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit(2) into a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    let can_raise = caps_effective().is_some_and(|c| c & (1 << 24) != 0); // CAP_SYS_RESOURCE
    if can_raise {
        NOFILE
    } else {
        NOFILE.min(r.rlim_max)
    }
}

fn caps_effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim()
        .to_string();
    u64::from_str_radix(&hex, 16).ok()
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest));
    m.set_typ(Some(typ.to_string()));
    m.set_source(Some(PathBuf::from(source)));
    m.set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

fn bind(dest: &str, source: &Path, options: &[&str]) -> Mount {
    let mut m = mount(dest, "bind", "", options);
    m.set_source(Some(source.to_path_buf()));
    m
}

fn oci(e: oci_spec::OciSpecError) -> SandboxError {
    SandboxError::InvalidSpec(format!("building OCI config: {e}"))
}

/// The environment of the sandbox's init, `KEY=value` strings; later entries override.
pub fn environment(spec: &SandboxSpec) -> Vec<String> {
    let mut env: Vec<(String, String)> = BASE_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push(("HOSTNAME".into(), spec.hostname.clone()));
    for (k, v) in &spec.env {
        if let Some(slot) = env.iter_mut().find(|(ek, _)| ek == k) {
            slot.1 = v.clone();
        } else {
            env.push((k.clone(), v.clone()));
        }
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Builds the OCI runtime spec of a sandbox. The rootfs is `rootfs` relative to the bundle.
pub fn oci_config(inp: &BundleInputs<'_>) -> Result<Spec> {
    let spec = inp.spec;
    if inp.userns.is_some() && inp.netns_path.is_some() {
        return Err(SandboxError::InvalidSpec(
            "a sandbox with a user namespace cannot join a pre-created network namespace".into(),
        ));
    }

    let caps: oci_spec::runtime::Capabilities = CAPABILITIES.iter().copied().collect();
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(caps.clone()));
    capabilities.set_effective(Some(caps.clone()));
    capabilities.set_permitted(Some(caps));
    capabilities.set_inheritable(Some(Default::default()));
    capabilities.set_ambient(Some(Default::default()));

    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(inp.nofile)
        .hard(inp.nofile)
        .build()
        .map_err(oci)?;

    let mut process = Process::default();
    process.set_terminal(Some(false));
    process.set_user(User::default());
    process.set_args(Some(vec![
        KILND_PATH_IN_SANDBOX.to_string(),
        "serve".into(),
        "--listen".into(),
        format!("{SOCKET_DIR_IN_SANDBOX}/{SOCKET_NAME}"),
    ]));
    process.set_env(Some(environment(spec)));
    process.set_cwd(PathBuf::from("/"));
    process.set_capabilities(Some(capabilities));
    process.set_rlimits(Some(vec![nofile]));
    process.set_no_new_privileges(Some(true));

    let mut root = Root::default();
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(false));

    let etc = |name: &str| inp.etc_dir_host.join(name);
    let file_bind = ["rbind", "rprivate", "nosuid", "nodev", "noexec"];
    let mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &[
                "nosuid",
                "noexec",
                "nodev",
                "mode=1777",
                &format!("size={SHM_SIZE}"),
            ],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        bind(
            KILND_PATH_IN_SANDBOX,
            inp.kilnd_host_path,
            &["rbind", "rprivate", "ro", "nosuid", "nodev"],
        ),
        bind(
            SOCKET_DIR_IN_SANDBOX,
            inp.run_dir_host,
            &["rbind", "rprivate", "rw", "nosuid", "nodev", "noexec"],
        ),
        bind("/etc/resolv.conf", &etc("resolv.conf"), &file_bind),
        bind("/etc/hosts", &etc("hosts"), &file_bind),
        bind("/etc/hostname", &etc("hostname"), &file_bind),
    ];

    let ns = |typ: LinuxNamespaceType, path: Option<&Path>| {
        let mut n = LinuxNamespace::default();
        n.set_typ(typ);
        n.set_path(path.map(Path::to_path_buf));
        n
    };
    let namespaces = vec![
        ns(LinuxNamespaceType::Pid, None),
        ns(LinuxNamespaceType::Network, inp.netns_path),
        ns(LinuxNamespaceType::Ipc, None),
        ns(LinuxNamespaceType::Uts, None),
        ns(LinuxNamespaceType::Mount, None),
        ns(LinuxNamespaceType::Cgroup, None),
    ];
    let mut namespaces = namespaces;
    if inp.userns.is_some() {
        namespaces.push(ns(LinuxNamespaceType::User, None));
    }

    let mut devices = vec![{
        let mut d = LinuxDeviceCgroup::default();
        d.set_allow(false);
        d.set_access(Some("rwm".into()));
        d
    }];
    for (major, minor, access) in ALLOWED_DEVICES {
        let mut d = LinuxDeviceCgroup::default();
        d.set_allow(true);
        d.set_typ(Some(LinuxDeviceType::C));
        d.set_major(Some(*major));
        d.set_minor(*minor);
        d.set_access(Some(access.to_string()));
        devices.push(d);
    }

    let memory = LinuxMemoryBuilder::default()
        .limit(spec.memory_bytes as i64)
        .swap(spec.memory_bytes as i64)
        .build()
        .map_err(oci)?;
    let mut cpu = LinuxCpu::default();
    cpu.set_period(Some(CPU_PERIOD_US));
    cpu.set_quota(Some(
        ((spec.cpus * CPU_PERIOD_US as f64).round() as i64).max(1000),
    ));
    cpu.set_shares(Some(
        ((spec.cpus * 1024.0).round() as u64).clamp(2, 262_144),
    ));
    let mut pids = LinuxPids::default();
    pids.set_limit(spec.pids_limit as i64);
    let mut resources = LinuxResources::default();
    resources.set_devices(Some(devices));
    resources.set_memory(Some(memory));
    resources.set_cpu(Some(cpu));
    resources.set_pids(Some(pids));

    // ICMP echo sockets for everyone, so `ping` works without CAP_NET_RAW. Gids are read in
    // the writer's user namespace, where only the mapped range exists.
    let groups = match inp.userns {
        Some(m) => format!("0 {}", m.size - 1),
        None => "0 2147483647".to_string(),
    };
    let sysctl = HashMap::from([("net.ipv4.ping_group_range".to_string(), groups)]);

    let linux = LinuxBuilder::default()
        .cgroups_path(PathBuf::from(&inp.cgroups_path))
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .seccomp(crate::seccomp::profile())
        .sysctl(sysctl)
        .uid_mappings(id_mappings(inp.userns))
        .gid_mappings(id_mappings(inp.userns))
        .build()
        .map_err(oci)?;

    let mut out = Spec::default();
    out.set_version("1.0.2".into());
    out.set_root(Some(root));
    out.set_process(Some(process));
    out.set_hostname(Some(spec.hostname.clone()));
    out.set_mounts(Some(mounts));
    out.set_linux(Some(linux));
    out.set_hooks(None);
    out.set_annotations(Some(HashMap::from([(
        "org.kiln.sandbox.id".to_string(),
        spec.id.clone(),
    )])));
    Ok(out)
}

/// Contents of the sandbox's `/etc/hosts`.
pub fn hosts_file(hostname: &str, ip: Option<&str>) -> String {
    let me = ip.unwrap_or("127.0.1.1");
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n{me}\t{hostname}\n"
    )
}

/// Contents of the sandbox's `/etc/resolv.conf`: the host's for `full` (loopback name
/// servers, which would point into the sandbox itself, are dropped), loopback-only for `none`.
pub fn resolv_conf(network: &NetworkMode, host_resolv: &str) -> String {
    match network {
        NetworkMode::None => "# kiln: this sandbox has no network\nnameserver 127.0.0.1\n".into(),
        NetworkMode::Full => {
            let mut out = String::new();
            let mut servers = 0;
            for line in host_resolv.lines() {
                let t = line.trim();
                if let Some(addr) = t.strip_prefix("nameserver") {
                    let addr = addr.trim();
                    if addr.starts_with("127.") || addr == "::1" {
                        continue;
                    }
                    servers += 1;
                }
                out.push_str(line);
                out.push('\n');
            }
            if servers == 0 {
                // Host uses a local stub resolver; fall back to public resolvers.
                out.push_str("nameserver 1.1.1.1\nnameserver 8.8.8.8\n");
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn inputs<'a>(spec: &'a SandboxSpec, netns: Option<&'a Path>) -> BundleInputs<'a> {
        BundleInputs {
            spec,
            cgroups_path: "/kiln/abcd1234/sb-1".into(),
            kilnd_host_path: Path::new("/opt/kiln/kilnd"),
            run_dir_host: Path::new("/run/kiln-abcd1234/sb-1"),
            etc_dir_host: Path::new("/var/lib/kiln/disk/sb-1/etc"),
            netns_path: netns,
            nofile: NOFILE,
            userns: None,
        }
    }

    fn json(spec: &SandboxSpec, netns: Option<&Path>) -> Value {
        serde_json::to_value(oci_config(&inputs(spec, netns)).expect("config")).expect("json")
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn process_runs_kilnd_hardened() {
        let mut s = SandboxSpec::new("sb-1", vec!["/img".into()]);
        s.env = vec![("FOO".into(), "bar".into()), ("PATH".into(), "/x".into())];
        let j = json(&s, None);
        let p = &j["process"];
        assert_eq!(
            strings(&p["args"]),
            ["/.kiln/kilnd", "serve", "--listen", "/.kiln/run/kilnd.sock"]
        );
        assert_eq!(p["terminal"], false);
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["noNewPrivileges"], true);
        let env = strings(&p["env"]);
        assert!(env.contains(&"FOO=bar".to_string()));
        assert!(env.contains(&"PATH=/x".to_string()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert!(env.contains(&"HOSTNAME=sb-1".to_string()));
        let caps = &p["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            let mut got = strings(&caps[set]);
            got.sort();
            let mut want = vec![
                "CAP_AUDIT_WRITE",
                "CAP_CHOWN",
                "CAP_DAC_OVERRIDE",
                "CAP_FOWNER",
                "CAP_FSETID",
                "CAP_KILL",
                "CAP_NET_BIND_SERVICE",
                "CAP_SETFCAP",
                "CAP_SETGID",
                "CAP_SETPCAP",
                "CAP_SETUID",
                "CAP_SYS_CHROOT",
            ];
            want.sort();
            assert_eq!(got, want, "{set}");
        }
        assert!(strings(&caps["ambient"]).is_empty());
        assert!(strings(&caps["inheritable"]).is_empty());
    }

    #[test]
    fn linux_section() {
        let mut s = SandboxSpec::new("sb-1", vec!["/img".into()]);
        s.cpus = 1.5;
        s.memory_bytes = 256 << 20;
        s.pids_limit = 100;
        let j = json(&s, None);
        let l = &j["linux"];
        assert_eq!(l["cgroupsPath"], "/kiln/abcd1234/sb-1");
        assert_eq!(l["resources"]["cpu"]["quota"], 150_000);
        assert_eq!(l["resources"]["cpu"]["period"], 100_000);
        assert_eq!(l["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(l["resources"]["memory"]["swap"], 256 << 20);
        assert_eq!(l["resources"]["pids"]["limit"], 100);
        let devs = l["resources"]["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(devs[0]["allow"], false);
        let ns: Vec<String> = l["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["type"].as_str().map(String::from))
            .collect();
        for t in ["pid", "network", "ipc", "uts", "mount", "cgroup"] {
            assert!(ns.contains(&t.to_string()), "{t}");
        }
        assert!(!ns.contains(&"user".to_string()));
        assert!(l["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|n| n.get("path").is_none()));
        assert!(strings(&l["maskedPaths"]).contains(&"/proc/kcore".to_string()));
        assert!(strings(&l["readonlyPaths"]).contains(&"/proc/sysrq-trigger".to_string()));
        assert_eq!(l["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(j["hooks"].is_null());
        assert_eq!(j["root"]["path"], "rootfs");
        assert_eq!(j["hostname"], "sb-1");
    }

    #[test]
    fn full_network_joins_the_prepared_netns() {
        let s = SandboxSpec::new("sb-1", vec!["/img".into()]);
        let j = json(&s, Some(Path::new("/run/kiln-abcd1234/netns/sb-1")));
        let net = j["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .cloned()
            .unwrap_or_default();
        assert_eq!(net["path"], "/run/kiln-abcd1234/netns/sb-1");
    }

    #[test]
    fn mounts() {
        let s = SandboxSpec::new("sb-1", vec!["/img".into()]);
        let j = json(&s, None);
        let mounts = j["mounts"].as_array().cloned().unwrap_or_default();
        let find = |d: &str| {
            mounts
                .iter()
                .find(|m| m["destination"] == d)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(find("/.kiln/kilnd")["source"], "/opt/kiln/kilnd");
        assert!(strings(&find("/.kiln/kilnd")["options"]).contains(&"ro".to_string()));
        assert_eq!(find("/.kiln/run")["source"], "/run/kiln-abcd1234/sb-1");
        assert_eq!(
            find("/etc/resolv.conf")["source"],
            "/var/lib/kiln/disk/sb-1/etc/resolv.conf"
        );
        assert!(strings(&find("/dev/pts")["options"]).contains(&"newinstance".to_string()));
        assert!(strings(&find("/dev/shm")["options"])
            .iter()
            .any(|o| o.starts_with("size=")));
        assert!(strings(&find("/sys")["options"]).contains(&"ro".to_string()));
        assert_eq!(find("/dev/mqueue")["type"], "mqueue");
        assert!(find("/tmp").is_null());
    }

    #[test]
    fn etc_files() {
        let h = hosts_file("box", Some("10.201.0.7"));
        assert!(h.contains("10.201.0.7\tbox\n"));
        assert!(hosts_file("box", None).contains("127.0.1.1\tbox\n"));
        let r = resolv_conf(
            &NetworkMode::Full,
            "search lan\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n",
        );
        assert_eq!(r, "search lan\nnameserver 10.0.0.2\n");
        let r = resolv_conf(&NetworkMode::Full, "nameserver 127.0.0.53\n");
        assert!(r.contains("1.1.1.1"));
        let r = resolv_conf(&NetworkMode::None, "nameserver 10.0.0.2\n");
        assert!(!r.contains("10.0.0.2"));
        assert!(r.contains("127.0.0.1"));
    }
}
