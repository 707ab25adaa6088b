//! The seccomp profile of every sandbox.
//!
//! # Design
//! `defaultAction` is `SCMP_ACT_ALLOW` and a deny-list returns an errno. A deny-list is
//! easier to keep dev-friendly than Docker's allow-list (new syscalls just work) and, combined
//! with the reduced capability set (no `CAP_SYS_ADMIN`, `CAP_SYS_MODULE`, `CAP_NET_ADMIN`,
//! `CAP_SYS_PTRACE` ...), covers the same attack surface that matters: the denied calls are
//! either privileged anyway (defence in depth against capability bugs) or are unprivileged but
//! historically rich in kernel bugs (`bpf`, `userfaultfd`, `io_uring`, `perf_event_open`,
//! `keyctl`, user/other namespace creation).
//!
//! Denied with `EPERM`:
//! * kernel/module/boot: `kexec_load`, `kexec_file_load`, `init_module`, `finit_module`,
//!   `delete_module`, `reboot`, `swapon`, `swapoff`, `acct`, `syslog`, `quotactl`,
//!   `quotactl_fd`, `lookup_dcookie`, `iopl`, `ioperm`, `vhangup`, `nfsservctl`, `uselib`,
//!   `create_module`, `get_kernel_syms`, `query_module`, `vm86`, `vm86old`, `_sysctl`;
//! * clocks: `settimeofday`, `stime`, `clock_settime`, `clock_settime64`, `clock_adjtime`,
//!   `clock_adjtime64`, `adjtimex`;
//! * mounts: `mount`, `umount`, `umount2`, `pivot_root`, `fsopen`, `fsconfig`, `fsmount`,
//!   `fspick`, `move_mount`, `open_tree`, `mount_setattr`;
//! * file handles: `open_by_handle_at`, `name_to_handle_at`;
//! * namespaces: `setns`, `unshare`, `clone` with any `CLONE_NEW*` flag (one rule per flag,
//!   because rules on one syscall are OR-ed while comparisons inside a rule are AND-ed);
//! * introspection of other processes: `ptrace`, `process_vm_readv`, `process_vm_writev`,
//!   `kcmp`, `pidfd_getfd`;
//! * attack surface: `bpf`, `perf_event_open`, `userfaultfd`, `keyctl`, `add_key`,
//!   `request_key`, `io_uring_setup`, `io_uring_enter`, `io_uring_register`, `fanotify_init`,
//!   `mbind`, `set_mempolicy`, `move_pages`, `migrate_pages`;
//! * `socket(AF_PACKET, ...)` (raw sockets are also impossible without `CAP_NET_RAW`);
//! * `personality` with any argument other than the harmless ones Docker allows
//!   (`0`, `PER_LINUX32` 0x8, `UNAME26` 0x20000, `0x20008` and the query `0xffffffff`).
//!
//! Denied with `ENOSYS`: `clone3`, whose flags live in a struct seccomp cannot inspect; libc
//! falls back to `clone` on `ENOSYS`, where the flag check above applies.
//!
//! Architectures: `SCMP_ARCH_X86_64`, `SCMP_ARCH_X86`, `SCMP_ARCH_X32`, so 32-bit entry points
//! get the same rules (runc adds an `ENOSYS` stub for other architectures).

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompOperator, LinuxSyscall,
};

/// Syscalls refused with `EPERM` regardless of arguments.
pub const DENIED: &[&str] = &[
    // kernel, modules, boot
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "vhangup",
    "nfsservctl",
    "uselib",
    "vm86",
    "vm86old",
    "_sysctl",
    // clocks
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    // mounts
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    // file handles
    "open_by_handle_at",
    "name_to_handle_at",
    // namespaces
    "setns",
    "unshare",
    // other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    // attack surface
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fanotify_init",
    "mbind",
    "set_mempolicy",
    "move_pages",
    "migrate_pages",
];

/// `CLONE_NEW*` flags refused in `clone`'s flags argument.
pub const CLONE_NS_FLAGS: &[(&str, u64)] = &[
    ("CLONE_NEWNS", 0x0002_0000),
    ("CLONE_NEWCGROUP", 0x0200_0000),
    ("CLONE_NEWUTS", 0x0400_0000),
    ("CLONE_NEWIPC", 0x0800_0000),
    ("CLONE_NEWUSER", 0x1000_0000),
    ("CLONE_NEWPID", 0x2000_0000),
    ("CLONE_NEWNET", 0x4000_0000),
];

const EPERM: u32 = libc::EPERM as u32;
const ENOSYS: u32 = libc::ENOSYS as u32;
const AF_PACKET: u64 = libc::AF_PACKET as u64;

fn arg(
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> LinuxSeccompArg {
    let b = LinuxSeccompArgBuilder::default()
        .index(index)
        .op(op)
        .value(value);
    let b = match value_two {
        Some(v) => b.value_two(v),
        None => b,
    };
    // All fields have defaults, so building cannot fail.
    b.build().unwrap_or_default()
}

fn rule(names: &[&str], errno: u32, args: Option<Vec<LinuxSeccompArg>>) -> LinuxSyscall {
    let mut s = LinuxSyscall::default();
    s.set_names(names.iter().map(|n| n.to_string()).collect());
    s.set_action(LinuxSeccompAction::ScmpActErrno);
    s.set_errno_ret(Some(errno));
    s.set_args(args);
    s
}

/// `personality` values that stay allowed (Docker's set): `PER_LINUX`, `PER_LINUX32`,
/// `UNAME26`, `PER_LINUX32|UNAME26` and the query `0xffffffff`.
pub const PERSONALITY_ALLOWED: &[u64] = &[0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Rules refusing every `personality` argument outside [`PERSONALITY_ALLOWED`], using only one
/// masked comparison per rule (libseccomp mishandles two comparisons on the same argument).
/// The kernel only looks at the low 32 bits, and so do the rules:
/// * an even value is refused when it has any bit other than 3 and 17 set;
/// * an odd value is refused unless it is `0xffffffff` (refused when any bit is clear).
fn personality_rules() -> Vec<LinuxSyscall> {
    use LinuxSeccompOperator::ScmpCmpMaskedEq;
    let mut v = Vec::new();
    for b in 1..32u32 {
        let bit = 1u64 << b;
        if b != 3 && b != 17 {
            v.push(rule(
                &["personality"],
                EPERM,
                Some(vec![arg(0, ScmpCmpMaskedEq, bit | 1, Some(bit))]),
            ));
        }
        v.push(rule(
            &["personality"],
            EPERM,
            Some(vec![arg(0, ScmpCmpMaskedEq, bit | 1, Some(1))]),
        ));
    }
    v
}

/// The profile described in the module documentation.
pub fn profile() -> LinuxSeccomp {
    use LinuxSeccompOperator::*;
    let mut syscalls = vec![rule(DENIED, EPERM, None), rule(&["clone3"], ENOSYS, None)];
    for (_, flag) in CLONE_NS_FLAGS {
        syscalls.push(rule(
            &["clone"],
            EPERM,
            Some(vec![arg(0, ScmpCmpMaskedEq, *flag, Some(*flag))]),
        ));
    }
    syscalls.push(rule(
        &["socket"],
        EPERM,
        Some(vec![arg(0, ScmpCmpEq, AF_PACKET, None)]),
    ));
    syscalls.extend(personality_rules());

    let mut s = LinuxSeccomp::default();
    s.set_default_action(LinuxSeccompAction::ScmpActAllow);
    s.set_architectures(Some(vec![
        Arch::ScmpArchX86_64,
        Arch::ScmpArchX86,
        Arch::ScmpArchX32,
    ]));
    s.set_syscalls(Some(syscalls));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_shape() {
        let p = profile();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        let archs = p.architectures().clone().unwrap_or_default();
        assert!(archs.contains(&Arch::ScmpArchX86_64));
        assert!(archs.contains(&Arch::ScmpArchX86));
        assert!(archs.contains(&Arch::ScmpArchX32));
        let json = serde_json::to_value(&p).expect("json");
        let text = json.to_string();
        for must in [
            "\"mount\"",
            "\"unshare\"",
            "\"bpf\"",
            "\"io_uring_setup\"",
            "\"keyctl\"",
            "\"ptrace\"",
        ] {
            assert!(text.contains(must), "{must} missing");
        }
        // clone3 answers ENOSYS so libc falls back to clone.
        let syscalls = p.syscalls().clone().unwrap_or_default();
        let clone3 = syscalls
            .iter()
            .find(|s| s.names().iter().any(|n| n == "clone3"))
            .expect("clone3");
        assert_eq!(clone3.errno_ret(), Some(38));
        // One clone rule per namespace flag, each a masked equality on arg 0.
        let clones: Vec<_> = syscalls
            .iter()
            .filter(|s| s.names() == &["clone".to_string()])
            .collect();
        assert_eq!(clones.len(), CLONE_NS_FLAGS.len());
        let a = clones[0].args().clone().unwrap_or_default();
        assert_eq!(a[0].op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(a[0].value(), a[0].value_two().unwrap_or(0));
        // personality: evaluate the rules (OR of rules, AND inside one) like libseccomp.
        let denied = |x: u64| {
            syscalls
                .iter()
                .filter(|s| s.names() == &["personality".to_string()])
                .any(|s| {
                    s.args()
                        .clone()
                        .unwrap_or_default()
                        .iter()
                        .all(|a| match a.op() {
                            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                                x & a.value() == a.value_two().unwrap_or(0)
                            }
                            _ => false,
                        })
                })
        };
        for ok in PERSONALITY_ALLOWED {
            assert!(!denied(*ok), "{ok:#x} must be allowed");
        }
        for bad in [
            1u64,
            2,
            5,
            7,
            9,
            0x40000,
            0x0400000,
            0x20009,
            0xffff_fffe,
            0x7fff_ffff,
            0x8000_0000,
            0x1_0004_0000,
        ] {
            assert!(denied(bad), "{bad:#x} must be refused");
        }
        // The serialized form uses the OCI field names.
        assert!(text.contains("\"valueTwo\""));
        assert!(text.contains("\"errnoRet\""));
        assert!(text.contains("SCMP_ARCH_X86_64"));
    }
}
