//! [`RealHost`]: the [`Host`] implementation for Linux (needs root).
//!
//! # Disk pool: btrfs + quota groups
//! The writable layers of all sandboxes live in one sparse image file, loop-mounted at
//! `data_dir/disk`. Each sandbox gets a **btrfs subvolume** `disk/<id>` (created with one
//! ioctl, ~0.2 ms) whose quota group carries a hard limit (`BTRFS_IOC_QGROUP_LIMIT`, ~20 µs);
//! writes past it fail with `EDQUOT` ("Disk quota exceeded"), for root too, and through
//! overlayfs. Removing a sandbox destroys the subvolume with one ioctl (the space is freed by
//! btrfs's cleaner in the background), so remove does not walk the upper layer.
//!
//! The original design used ext4 project quotas (`FS_IOC_FSSETXATTR` + `quotactl`), but the
//! target kernel is built without `CONFIG_QFMT_V2` (ext4 quota files) and without
//! `CONFIG_XFS_QUOTA`, so neither ext4 nor xfs can enforce per-directory limits there; btrfs
//! quota groups do not depend on either option. Simple quotas (kernel ≥ 6.7) are enabled when
//! available (cheaper accounting), full qgroups otherwise. Host requirement: `mkfs.btrfs`
//! (Debian package `btrfs-progs`), used once when the pool is created.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::error::{IoContext, Result, SandboxError};
use crate::host::{CgroupRoot, Host, MountEntry, PoolInfo, VethConfig};
use crate::netlink::Netlink;

/// The real thing.
#[derive(Debug, Default, Clone)]
pub struct RealHost;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_dir(p: &Path) -> io::Result<OwnedFd> {
    let c = cstr(p)?;
    // SAFETY: c is a valid C string; the result is checked.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------------
// btrfs ioctls

const fn btrfs_ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0x94 << 8) | nr
}
const IOC_W: u64 = 1;
const IOC_R: u64 = 2;
const IOC_RW: u64 = 3;
const BTRFS_IOC_SNAP_DESTROY: u64 = btrfs_ioc(IOC_W, 15, 4096);
const BTRFS_IOC_SUBVOL_CREATE: u64 = btrfs_ioc(IOC_W, 14, 4096);
const BTRFS_IOC_INO_LOOKUP: u64 = btrfs_ioc(IOC_RW, 18, 4096);
const BTRFS_IOC_QUOTA_CTL: u64 = btrfs_ioc(IOC_RW, 40, 16);
const BTRFS_IOC_QGROUP_CREATE: u64 = btrfs_ioc(IOC_W, 42, 16);
const BTRFS_IOC_QGROUP_LIMIT: u64 = btrfs_ioc(IOC_R, 43, 48);
const BTRFS_QUOTA_CTL_ENABLE: u64 = 1;
const BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

impl VolArgs {
    fn new(name: &str) -> io::Result<Box<VolArgs>> {
        if name.is_empty() || name.len() >= 4088 || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad volume name",
            ));
        }
        let mut a = Box::new(VolArgs {
            fd: 0,
            name: [0; 4088],
        });
        a.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(a)
    }
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` points to a properly sized, initialised structure for `req`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) }).map(|_| ())
}

/// Subvolume (tree) id of the subvolume `dir` is in.
fn subvol_id(dir: &OwnedFd) -> io::Result<u64> {
    #[repr(C)]
    struct InoLookup {
        treeid: u64,
        objectid: u64,
        name: [u8; 4080],
    }
    let mut a = Box::new(InoLookup {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; 4080],
    });
    ioctl(dir, BTRFS_IOC_INO_LOOKUP, &mut *a)?;
    Ok(a.treeid)
}

fn enable_quota(mount_point: &Path) -> io::Result<&'static str> {
    let fd = open_dir(mount_point)?;
    let mut args = [BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA, 0u64];
    match ioctl(&fd, BTRFS_IOC_QUOTA_CTL, &mut args) {
        Ok(()) => Ok("simple quotas"),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
            ) =>
        {
            let mut args = [BTRFS_QUOTA_CTL_ENABLE, 0u64];
            ioctl(&fd, BTRFS_IOC_QUOTA_CTL, &mut args)?;
            Ok("qgroups")
        }
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// mountinfo

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape_mountinfo(l[4])),
            fs_type: r[0].to_string(),
            source: unescape_mountinfo(r[1]),
            super_options: r[2].to_string(),
        });
    }
    out
}

const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "net_cls",
    "net_prio",
    "perf_event",
    "hugetlb",
    "rdma",
    "misc",
];

/// cgroup hierarchies found in a mount table.
pub fn cgroup_roots_from(mounts: &[MountEntry]) -> Vec<CgroupRoot> {
    let mut out: Vec<CgroupRoot> = Vec::new();
    for m in mounts {
        let root = match m.fs_type.as_str() {
            "cgroup" => CgroupRoot {
                mount_point: m.mount_point.clone(),
                unified: false,
                controllers: m
                    .super_options
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o) || o.starts_with("name="))
                    .map(String::from)
                    .collect(),
            },
            "cgroup2" => CgroupRoot {
                mount_point: m.mount_point.clone(),
                unified: true,
                controllers: fs::read_to_string(m.mount_point.join("cgroup.controllers"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(String::from)
                    .collect(),
            },
            _ => continue,
        };
        // The same hierarchy can be mounted twice; keep the first mount of each controller set.
        if !out
            .iter()
            .any(|o| o.unified == root.unified && o.controllers == root.controllers)
        {
            out.push(root);
        }
    }
    out
}

fn run_tool(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SandboxError::Host(format!("running {}: {e}", argv[0])))?;
    if !out.status.success() {
        return Err(SandboxError::Host(format!(
            "`{}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft_name(bridge: &str) -> String {
    bridge.replace('-', "_")
}

/// The nftables script installed by [`Host::ensure_nat`]. Re-running it is idempotent: the
/// chains are created if missing and flushed and refilled in the same transaction.
///
/// Sandboxes with an egress allow-list are sent to their own chain by the map
/// `egress_<bridge>` (see [`crate::egress`]) from the forward chain and an input chain.
pub fn nat_script(bridge: &str, subnet: &str) -> String {
    let b = nft_name(bridge);
    let egress = crate::egress::base_script(&b, bridge);
    format!(
        "add table inet kiln\n\
         add chain inet kiln nat_{b} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add chain inet kiln fwd_{b} {{ type filter hook forward priority filter; policy accept; }}\n\
         flush chain inet kiln nat_{b}\n\
         flush chain inet kiln fwd_{b}\n\
         add rule inet kiln nat_{b} ip saddr {subnet} oifname != \"{bridge}\" masquerade\n\
         {egress}\
         add rule inet kiln fwd_{b} iifname \"{bridge}\" ip saddr vmap @egress_{b}\n\
         add rule inet kiln fwd_{b} iifname \"{bridge}\" accept\n\
         add rule inet kiln fwd_{b} oifname \"{bridge}\" ct state established,related accept\n"
    )
}

/// The sandbox's MAC address, derived from its IPv4 address (`02:6b:` + the 4 address
/// bytes, locally administered). An address always maps to the same MAC, so the host's ARP
/// cache stays right when an address is reused by a new sandbox.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x6b, o[0], o[1], o[2], o[3]]
}

impl RealHost {
    fn overlay_data(lower: &[PathBuf], upper: &Path, work: &Path) -> String {
        let lower: Vec<String> = lower
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        )
    }

    /// Overlay mount through the new mount API, one `lowerdir+` per layer (no 4 KiB limit on
    /// the option string; kernel ≥ 6.8).
    fn mount_overlay_fsconfig(
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        const FSOPEN_CLOEXEC: libc::c_uint = 1;
        const FSCONFIG_SET_STRING: libc::c_uint = 1;
        const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
        const FSMOUNT_CLOEXEC: libc::c_uint = 1;
        const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
        let fstype = CString::new("overlay").map_err(io::Error::other)?;
        // SAFETY: valid C string; result checked.
        let fsfd = check(
            unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) }
                as libc::c_int,
        )?;
        // SAFETY: fresh descriptor we own.
        let fsfd = unsafe { OwnedFd::from_raw_fd(fsfd) };
        let set = |key: &str, val: &Path| -> io::Result<()> {
            let k = CString::new(key).map_err(io::Error::other)?;
            let v = cstr(val)?;
            // SAFETY: valid descriptor and C strings; result checked.
            check(unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    fsfd.as_raw_fd(),
                    FSCONFIG_SET_STRING,
                    k.as_ptr(),
                    v.as_ptr(),
                    0,
                )
            } as libc::c_int)
            .map(|_| ())
        };
        for l in lower {
            set("lowerdir+", l)?;
        }
        set("upperdir", upper)?;
        set("workdir", work)?;
        // SAFETY: valid descriptor; null key/value are what FSCONFIG_CMD_CREATE expects.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fsfd.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_char>(),
                0,
            )
        } as libc::c_int)?;
        // SAFETY: valid descriptor; result checked.
        let mfd =
            check(
                unsafe { libc::syscall(libc::SYS_fsmount, fsfd.as_raw_fd(), FSMOUNT_CLOEXEC, 0) }
                    as libc::c_int,
            )?;
        // SAFETY: fresh descriptor we own.
        let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
        let empty = CString::new("").map_err(io::Error::other)?;
        let t = cstr(target)?;
        // SAFETY: valid descriptors and C strings; result checked.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mfd.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        } as libc::c_int)
        .map(|_| ())
    }

    /// Runs in a short-lived thread: moves the thread into the target network namespace
    /// (a fresh one pinned at a path, or an existing process's) and configures it there.
    fn netns_thread(target: NetnsTarget, veth: Option<&VethConfig>) -> io::Result<()> {
        // Host-side socket first, while this thread is still in the host namespace.
        let mut host_nl = match veth {
            Some(_) => Some(Netlink::open()?),
            None => None,
        };
        match &target {
            NetnsTarget::Fresh(path) => {
                // SAFETY: unshare only affects this (short-lived) thread.
                check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
                fs::File::create(path)?;
                let src = cstr(Path::new("/proc/thread-self/ns/net"))?;
                let dst = cstr(path)?;
                // SAFETY: valid C strings; a bind mount of this thread's namespace file.
                check(unsafe {
                    libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                })?;
            }
            NetnsTarget::Process(pid) => {
                // A thread may join a network namespace (only user namespaces need a
                // single-threaded caller); host root holds CAP_SYS_ADMIN over namespaces
                // owned by a sandbox's user namespace, a descendant of the host's.
                let f = fs::File::open(format!("/proc/{pid}/ns/net"))?;
                // SAFETY: a valid namespace fd; setns only affects this thread.
                check(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) })?;
            }
        }
        let mut ns_nl = Netlink::open()?;
        if matches!(target, NetnsTarget::Fresh(_)) {
            ns_nl.link_up(1)?; // lo is always index 1 in a fresh namespace
        }
        if let (Some(v), Some(host)) = (veth, host_nl.as_mut()) {
            let nsfd = fs::File::open("/proc/thread-self/ns/net")?;
            let master = host.link_index(&v.bridge)?;
            let mac = mac_for(v.address);
            match host.create_veth(&v.host_name, master, "eth0", mac, nsfd.as_raw_fd()) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A previous sandbox with this id whose namespace the kernel is still
                    // tearing down (that happens asynchronously): remove its veth now.
                    host.delete_link(&v.host_name)?;
                    host.create_veth(&v.host_name, master, "eth0", mac, nsfd.as_raw_fd())?;
                }
                r => r?,
            }
            let host_idx = host.link_index(&v.host_name)?;
            if let Err(e) = host.set_port_isolated(host_idx) {
                warn!(veth = %v.host_name, "cannot isolate bridge port: {e}");
            }
            let eth0 = ns_nl.link_index("eth0")?;
            ns_nl.link_up(eth0)?;
            ns_nl.add_address(eth0, v.address, v.prefix)?;
            ns_nl.add_default_route(eth0, v.gateway)?;
        }
        Ok(())
    }
}

/// Where [`RealHost::netns_thread`] configures a network.
enum NetnsTarget {
    /// A new namespace, pinned by a bind mount at this path.
    Fresh(PathBuf),
    /// The namespace process `pid` is in (created by the OCI runtime).
    Process(u32),
}

impl Host for RealHost {
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        let data = Self::overlay_data(lower, upper, work);
        if data.len() >= 4000 {
            return Self::mount_overlay_fsconfig(lower, upper, work, target);
        }
        let src = CString::new("overlay").map_err(io::Error::other)?;
        let t = cstr(target)?;
        let d = CString::new(data).map_err(io::Error::other)?;
        // SAFETY: valid C strings; result checked.
        check(unsafe { libc::mount(src.as_ptr(), t.as_ptr(), src.as_ptr(), 0, d.as_ptr().cast()) })
            .map(|_| ())
    }

    fn mount_tmpfs(&self, target: &Path, options: &str) -> io::Result<()> {
        let src = CString::new("tmpfs").map_err(io::Error::other)?;
        let t = cstr(target)?;
        let d = CString::new(options).map_err(io::Error::other)?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        // SAFETY: valid C strings; result checked.
        check(unsafe {
            libc::mount(
                src.as_ptr(),
                t.as_ptr(),
                src.as_ptr(),
                flags,
                d.as_ptr().cast(),
            )
        })
        .map(|_| ())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        let t = cstr(target)?;
        for _ in 0..16 {
            // SAFETY: valid C string.
            let r = unsafe { libc::umount2(t.as_ptr(), libc::UMOUNT_NOFOLLOW) };
            if r == 0 {
                continue; // something might be stacked below; go again until EINVAL
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ENOENT) | Some(libc::ENOTDIR) => return Ok(()),
                Some(libc::EBUSY) => {
                    warn!(target = %target.display(), "mount busy, detaching lazily");
                    // SAFETY: valid C string.
                    check(unsafe {
                        libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW)
                    })?;
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    fn mounts(&self) -> io::Result<Vec<MountEntry>> {
        Ok(parse_mountinfo(&fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    fn prepare_pool(&self, image: &Path, bytes: u64, mount_point: &Path) -> Result<PoolInfo> {
        fs::create_dir_all(mount_point).ctx(|| format!("creating {}", mount_point.display()))?;
        let find = || -> Result<Option<MountEntry>> {
            Ok(self
                .mounts()
                .ctx(|| "reading mountinfo".into())?
                .into_iter()
                .rev()
                .find(|m| m.mount_point == mount_point))
        };
        let mut created = false;
        if let Some(m) = find()? {
            if m.fs_type != "btrfs" {
                return Err(SandboxError::Host(format!(
                    "{} is mounted but is {}, not the btrfs disk pool",
                    mount_point.display(),
                    m.fs_type
                )));
            }
            debug!(device = %m.source, "reusing mounted disk pool");
        } else {
            if !image.exists() {
                // Format under a temporary name so a crash never leaves a half-made pool.
                let tmp = image.with_extension("img.tmp");
                let f = fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
                f.set_len(bytes)
                    .ctx(|| format!("sizing {}", tmp.display()))?;
                drop(f);
                let t = tmp.to_string_lossy().into_owned();
                run_tool(&[
                    "mkfs.btrfs",
                    "-q",
                    "-f",
                    "-K",
                    "-m",
                    "single",
                    "-d",
                    "single",
                    "-L",
                    "kiln-pool",
                    &t,
                ])
                .map_err(|e| SandboxError::Host(format!("{e} (is btrfs-progs installed?)")))?;
                fs::rename(&tmp, image).ctx(|| format!("renaming {}", tmp.display()))?;
                created = true;
                info!(image = %image.display(), bytes, "created disk pool");
            }
            let img = image.to_string_lossy().into_owned();
            let mp = mount_point.to_string_lossy().into_owned();
            run_tool(&[
                "mount",
                "-t",
                "btrfs",
                "-o",
                "loop,noatime,discard=async",
                &img,
                &mp,
            ])?;
        }
        let mode = enable_quota(mount_point)
            .kctx(|| format!("enabling btrfs quotas on {}", mount_point.display()))?;
        let m = find()?.ok_or_else(|| {
            SandboxError::Host(format!("{} did not get mounted", mount_point.display()))
        })?;
        debug!(device = %m.source, mode, "disk pool ready");
        Ok(PoolInfo {
            mount_point: mount_point.to_path_buf(),
            device: m.source,
            created,
        })
    }

    fn release_pool(&self, mount_point: &Path) -> io::Result<()> {
        self.unmount(mount_point)
    }

    fn create_volume(&self, pool: &Path, name: &str, limit_bytes: u64) -> io::Result<u64> {
        let pfd = open_dir(pool)?;
        let mut a = VolArgs::new(name)?;
        ioctl(&pfd, BTRFS_IOC_SUBVOL_CREATE, &mut *a)?;
        let limit = || -> io::Result<u64> {
            let vfd = open_dir(&pool.join(name))?;
            // struct btrfs_ioctl_qgroup_limit_args { qgroupid; { flags, max_rfer, max_excl, rsv_rfer, rsv_excl } }
            // qgroupid 0 = the subvolume the descriptor is in.
            let mut args = [0u64, BTRFS_QGROUP_LIMIT_MAX_RFER, limit_bytes, 0, 0, 0];
            ioctl(&vfd, BTRFS_IOC_QGROUP_LIMIT, &mut args)?;
            subvol_id(&vfd)
        };
        match limit() {
            Ok(id) => Ok(id),
            Err(e) => {
                let _ = self.delete_volume(pool, name);
                Err(e)
            }
        }
    }

    fn volume_usage(&self, device: &str, pool: &Path, name: &str) -> io::Result<Option<u64>> {
        // btrfs publishes every quota group under /sys/fs/btrfs/<fsid>/qgroups/0_<subvol>;
        // the pool's fsid directory is the one listing its loop device.
        let vfd = open_dir(&pool.join(name))?;
        let id = subvol_id(&vfd)?;
        let dev = Path::new(device)
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        for fs_dir in fs::read_dir("/sys/fs/btrfs")?.flatten() {
            if !fs_dir.path().join("devices").join(&dev).exists() {
                continue;
            }
            let f = fs_dir.path().join(format!("qgroups/0_{id}/referenced"));
            return match fs::read_to_string(&f) {
                Ok(s) => Ok(s.trim().parse().ok()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            };
        }
        Ok(None)
    }

    fn delete_volume(&self, pool: &Path, name: &str) -> io::Result<()> {
        let path = pool.join(name);
        let vfd = match open_dir(&path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let id = subvol_id(&vfd).ok();
        drop(vfd);
        let pfd = open_dir(pool)?;
        let mut a = VolArgs::new(name)?;
        match ioctl(&pfd, BTRFS_IOC_SNAP_DESTROY, &mut *a) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Not a subvolume (a plain directory left by something else): remove it as such.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::ENOTDIR) | Some(libc::EPERM)
                ) =>
            {
                return fs::remove_dir_all(&path);
            }
            Err(e) => return Err(e),
        }
        // Drop the quota group too; btrfs refuses while the cleaner has not freed the data
        // yet, in which case the (tiny) stale group stays until the next reconcile.
        if let Some(id) = id.filter(|&i| i >= BTRFS_FIRST_FREE_OBJECTID) {
            let mut args = [0u64, id];
            if let Err(e) = ioctl(&pfd, BTRFS_IOC_QGROUP_CREATE, &mut args) {
                debug!(qgroup = id, "stale quota group kept for now: {e}");
            }
        }
        Ok(())
    }

    fn cgroup_roots(&self) -> io::Result<Vec<CgroupRoot>> {
        Ok(cgroup_roots_from(&self.mounts()?))
    }

    fn kill_init(&self, pid: u32, cgroup_rel: &str, timeout: Duration) -> io::Result<bool> {
        // SAFETY: pidfd_open(2); result checked.
        let fd =
            unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as libc::c_int;
        if fd < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // SAFETY: fresh descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The pidfd pins the identity; now check it is really the sandbox's process.
        let cg = match fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            Ok(c) => c,
            Err(_) => return Ok(false),
        };
        let suffix = format!(":{}", cgroup_rel);
        if !cg.lines().any(|l| l.ends_with(&suffix)) {
            debug!(
                pid,
                cgroup_rel, "pid is not in the sandbox's cgroup; not killing it"
            );
            return Ok(false);
        }
        // SAFETY: pidfd_send_signal(2) on our descriptor.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // A frozen process only dies once thawed.
        for root in self.cgroup_roots()? {
            let dir = root.mount_point.join(cgroup_rel.trim_start_matches('/'));
            if root.controllers.iter().any(|c| c == "freezer") {
                let _ = fs::write(dir.join("freezer.state"), "THAWED");
            } else if root.unified && dir.join("cgroup.freeze").exists() {
                let _ = fs::write(dir.join("cgroup.freeze"), "0");
            }
        }
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as libc::c_int,
            )
        };
        if n == 0 {
            warn!(
                pid,
                "sandbox init did not exit within {timeout:?} of SIGKILL"
            );
        }
        Ok(true)
    }

    /// Remounts the cgroup2 hierarchy with `favordynmods` (kernel ≥ 6.0). Every task
    /// migration (runc writing the container's pid to `cgroup.procs`) otherwise waits for an
    /// RCU grace period on the global `cgroup_threadgroup_rwsem`; measured here, that is ~10 ms
    /// of runc's ~30 ms. The price is slightly slower fork/exit host-wide.
    fn tune_cgroups(&self) -> io::Result<()> {
        for m in self.mounts()? {
            if m.fs_type == "cgroup2" && !m.super_options.split(',').any(|o| o == "favordynmods") {
                let t = cstr(&m.mount_point)?;
                let data = CString::new("favordynmods").map_err(io::Error::other)?;
                let fstype = CString::new("cgroup2").map_err(io::Error::other)?;
                // SAFETY: valid C strings; a remount of an existing cgroup2 mount.
                let r = unsafe {
                    libc::mount(
                        fstype.as_ptr(),
                        t.as_ptr(),
                        fstype.as_ptr(),
                        libc::MS_REMOUNT,
                        data.as_ptr().cast(),
                    )
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                info!(mount = %m.mount_point.display(), "cgroup2 remounted with favordynmods");
            }
        }
        Ok(())
    }

    fn destroy_cgroup(&self, dir: &Path, root: &CgroupRoot) -> io::Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        // Children first.
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    self.destroy_cgroup(&e.path(), root)?;
                }
            }
        }
        let kill_file = dir.join("cgroup.kill");
        let freezer = dir.join("freezer.state");
        for attempt in 0..200 {
            if root.unified && kill_file.exists() {
                let _ = fs::write(&kill_file, "1");
            } else {
                if freezer.exists() {
                    let _ = fs::write(&freezer, "THAWED");
                }
                for pid in fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: plain kill(2).
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            match fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 199 => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn ensure_bridge(&self, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<()> {
        if !Path::new("/sys/class/net").join(bridge).exists() {
            if let Err(e) = run_tool(&["ip", "link", "add", "name", bridge, "type", "bridge"]) {
                // Another server may have raced us.
                if !Path::new("/sys/class/net").join(bridge).exists() {
                    return Err(e);
                }
            }
        }
        let cidr = format!("{gateway}/{prefix}");
        run_tool(&["ip", "addr", "replace", &cidr, "dev", bridge])?;
        run_tool(&["ip", "link", "set", bridge, "up"])?;
        Ok(())
    }

    fn ensure_nat(&self, bridge: &str, subnet: &str) -> Result<()> {
        fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .kctx(|| "enabling net.ipv4.ip_forward".into())?;
        crate::egress::nft(&nat_script(bridge, subnet))
            .map_err(|e| SandboxError::Host(format!("setting up NAT: {e}")))
    }

    fn create_netns(&self, path: &Path, veth: Option<&VethConfig>) -> io::Result<()> {
        let p = path.to_path_buf();
        let v = veth.cloned();
        let res = std::thread::Builder::new()
            .name("kiln-netns".into())
            .spawn(move || Self::netns_thread(NetnsTarget::Fresh(p), v.as_ref()))?
            .join()
            .map_err(|_| io::Error::other("netns thread panicked"))?;
        if let Err(e) = res {
            if let Some(v) = veth {
                let _ = self.delete_link(&v.host_name);
            }
            let _ = self.delete_netns(path);
            return Err(e);
        }
        Ok(())
    }

    fn attach_veth(&self, pid: u32, veth: &VethConfig) -> io::Result<()> {
        let v = veth.clone();
        let res = std::thread::Builder::new()
            .name("kiln-netns".into())
            .spawn(move || Self::netns_thread(NetnsTarget::Process(pid), Some(&v)))?
            .join()
            .map_err(|_| io::Error::other("netns thread panicked"))?;
        if let Err(e) = res {
            let _ = self.delete_link(&veth.host_name);
            return Err(e);
        }
        Ok(())
    }

    fn delete_netns(&self, path: &Path) -> io::Result<()> {
        let c = cstr(path)?;
        // SAFETY: valid C string. EINVAL/ENOENT (not mounted / missing) are fine.
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
                return Err(e);
            }
        }
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn nft(&self, script: &str) -> io::Result<()> {
        crate::egress::nft(script)
    }

    fn delete_link(&self, name: &str) -> io::Result<()> {
        match Netlink::open()?.delete_link(name) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENOENT)) => Ok(()),
            r => r,
        }
    }

    fn bridge_ports(&self, bridge: &str) -> io::Result<Vec<String>> {
        match fs::read_dir(Path::new("/sys/class/net").join(bridge).join("brif")) {
            Ok(rd) => Ok(rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n\
                    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    90 27 0:50 / /var/lib/kiln/sandboxes/sb\\0401/rootfs rw shared:5 - overlay overlay rw,lowerdir=/a\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[4].mount_point,
            PathBuf::from("/var/lib/kiln/sandboxes/sb 1/rootfs")
        );
        assert_eq!(m[4].fs_type, "overlay");
        assert_eq!(m[0].source, "/dev/vda");
        let roots = cgroup_roots_from(&m);
        assert_eq!(roots.len(), 3);
        assert_eq!(roots[0].controllers, vec!["memory".to_string()]);
        assert_eq!(roots[1].controllers, vec!["name=systemd".to_string()]);
        assert!(roots[2].unified);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(BTRFS_IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(BTRFS_IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(BTRFS_IOC_QUOTA_CTL, 0xc010_9428);
        assert_eq!(BTRFS_IOC_QGROUP_LIMIT, 0x8030_942b);
        assert_eq!(BTRFS_IOC_INO_LOOKUP, 0xd000_9412);
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
    }

    #[test]
    fn nat_script_is_scoped_to_the_bridge() {
        let s = nat_script("kiln-t1", "10.9.0.0/16");
        assert!(s.contains("add chain inet kiln nat_kiln_t1"));
        assert!(s.contains("ip saddr 10.9.0.0/16 oifname != \"kiln-t1\" masquerade"));
        assert!(s.contains("flush chain inet kiln fwd_kiln_t1"));
    }
}
