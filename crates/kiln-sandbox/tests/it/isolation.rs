//! What a sandbox must not be able to do.

use crate::{require_root, run, sh, Harness};

/// Bit mask of the capabilities a sandbox keeps (see `kiln_sandbox::spec::CAPABILITIES`):
/// CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6, SETUID 7, SETPCAP 8,
/// NET_BIND_SERVICE 10, SYS_CHROOT 18, AUDIT_WRITE 29, SETFCAP 31.
const CAPS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 18)
    | (1 << 29)
    | (1 << 31);

/// A perl one-liner making a raw syscall and printing errno's text (empty on success).
fn syscall(nr: u32, args: &str) -> String {
    format!("perl -e '$r = syscall({nr}{args}); print $r < 0 ? \"$!\" : \"ok\"'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_battery() {
    require_root!();
    let h = Harness::new().await;
    h.rt.create(&h.spec("iso-a")).await.expect("create a");
    h.rt.create(&h.spec("iso-b")).await.expect("create b");
    let a = |s: &'static str| sh(&h.rt, "iso-a", s);

    // Processes: only the sandbox's own.
    let out = a("ls /proc | grep -c '^[0-9]'").await;
    let n: u32 = out.stdout.trim().parse().expect("count");
    assert!(n < 10, "sandbox sees {n} processes: {out:?}");
    let my_pid = std::process::id();
    let out = sh(
        &h.rt,
        "iso-a",
        &format!("cat /proc/{my_pid}/cmdline 2>/dev/null | tr '\\0' ' '"),
    )
    .await;
    assert!(
        !out.stdout.contains("it-"),
        "host test process visible: {out:?}"
    );

    // Credentials and confinement.
    let out =
        a("grep -E '^(CapEff|CapBnd|CapPrm|CapInh|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status")
            .await;
    let field = |k: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        u64::from_str_radix(&field("CapEff:"), 16).ok(),
        Some(CAPS),
        "{out:?}"
    );
    assert_eq!(
        u64::from_str_radix(&field("CapBnd:"), 16).ok(),
        Some(CAPS),
        "{out:?}"
    );
    assert_eq!(u64::from_str_radix(&field("CapInh:"), 16).ok(), Some(0));
    assert_eq!(u64::from_str_radix(&field("CapAmb:"), 16).ok(), Some(0));
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");

    // Mounting is impossible (no CAP_SYS_ADMIN, seccomp), and so are new namespaces.
    let out = a("mount -t tmpfs none /mnt 2>&1; echo rc=$?").await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    let out = a("unshare -U -r true 2>&1; echo rc=$?").await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    let out = a("unshare -n true 2>&1; echo rc=$?").await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    // clone with CLONE_NEWUSER (0x10000000) | SIGCHLD: refused by seccomp.
    let out = sh(&h.rt, "iso-a", &syscall(56, ", 0x10000011, 0, 0, 0, 0")).await;
    assert_eq!(out.stdout, "Operation not permitted", "{out:?}");
    // clone3 answers ENOSYS so libc falls back to clone.
    let out = sh(&h.rt, "iso-a", &syscall(435, ", 0, 0")).await;
    assert_eq!(out.stdout, "Function not implemented", "{out:?}");

    // Kernel interfaces.
    let out = a("echo h > /proc/sysrq-trigger 2>&1; echo rc=$?").await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    let out = a("echo 1 > /proc/sys/kernel/panic 2>&1; echo rc=$?").await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    let out = a("head -c 16 /proc/kcore | wc -c; cat /proc/keys | wc -c").await;
    assert_eq!(
        out.stdout.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"],
        "{out:?}"
    );
    let out = a("touch /sys/kernel/x 2>&1; echo rc=$?").await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    // init_module / finit_module / delete_module.
    for (nr, args) in [(175, ", 0, 0, 0"), (313, ", 0, 0, 0"), (176, ", 0, 0")] {
        let out = sh(&h.rt, "iso-a", &syscall(nr, args)).await;
        assert_eq!(
            out.stdout, "Operation not permitted",
            "module syscall {nr}: {out:?}"
        );
    }
    // bpf, perf_event_open, keyctl, ptrace.
    for (nr, args) in [
        (321, ", 0, 0, 0"),
        (298, ", 0, 0, -1, -1, 0"),
        (250, ", 0, 0"),
        (101, ", 16, 1, 0, 0"),
    ] {
        let out = sh(&h.rt, "iso-a", &syscall(nr, args)).await;
        assert_eq!(
            out.stdout, "Operation not permitted",
            "syscall {nr}: {out:?}"
        );
    }
    // personality: querying (0xffffffff) and PER_LINUX32 (linux32) work, disabling ASLR
    // (ADDR_NO_RANDOMIZE 0x0040000) does not.
    let out = sh(&h.rt, "iso-a", &syscall(135, ", 0xffffffff")).await;
    assert_eq!(out.stdout, "ok", "{out:?}");
    let out = sh(&h.rt, "iso-a", &syscall(135, ", 0x0040000")).await;
    assert_eq!(out.stdout, "Operation not permitted", "{out:?}");
    let out = a("setarch -R true 2>&1; echo rc=$?").await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    let out = a("linux32 uname -m").await;
    assert_eq!(out.stdout.trim(), "i686", "{out:?}");

    // No device nodes beyond the basics; creating one is refused.
    let out = a("ls /dev | tr '\\n' ' '; mknod /dev/sda1 b 8 1 2>&1; echo rc=$?").await;
    assert!(
        !out.stdout.contains("rc=0") && !out.stdout.contains("sda "),
        "{out:?}"
    );

    // Raw and packet sockets.
    let out = a("perl -MSocket -e 'socket(my $s, PF_INET, SOCK_RAW, 1) or print \"$!\"'").await;
    assert_eq!(out.stdout, "Operation not permitted", "{out:?}");
    let out = a("perl -MSocket -e 'socket(my $s, 17, SOCK_RAW, 0) or print \"$!\"'").await;
    assert_eq!(out.stdout, "Operation not permitted", "{out:?}");
    // Unprivileged ICMP sockets work (ping without CAP_NET_RAW).
    let out = a(
        "perl -MSocket -e 'socket(my $s, PF_INET, SOCK_DGRAM, 1) or print \"$!\"; print \"ok\"'",
    )
    .await;
    assert_eq!(out.stdout, "ok", "{out:?}");

    // No network: only loopback exists, nothing off-box is reachable.
    let out = a("ls /sys/class/net | tr '\\n' ' '").await;
    assert_eq!(out.stdout.trim(), "lo", "{out:?}");
    let out = a("timeout 2 bash -c 'echo > /dev/tcp/10.201.0.1/22' 2>&1; echo rc=$?").await;
    assert!(
        !out.stdout.contains("rc=0") && out.stdout.contains("unreachable"),
        "{out:?}"
    );
    let out = a("cat /etc/resolv.conf").await;
    assert!(
        out.stdout.contains("127.0.0.1") && !out.stdout.contains("10.255"),
        "{out:?}"
    );
    // Loopback works.
    let out = a("perl -MIO::Socket::INET -e '$l = IO::Socket::INET->new(Listen => 1, LocalAddr => \"127.0.0.1:5555\", ReuseAddr => 1) or die $!; \
                 $c = IO::Socket::INET->new(\"127.0.0.1:5555\") or die $!; print \"ok\"'").await;
    assert_eq!(out.stdout, "ok", "{out:?}");

    // Another sandbox's files are out of reach.
    assert!(sh(&h.rt, "iso-b", "echo topsecret > /root/secret-b")
        .await
        .ok());
    let out = a("grep -rs topsecret / --exclude-dir=proc --exclude-dir=sys 2>/dev/null | head -3; ls /.kiln/run").await;
    assert!(!out.stdout.contains("topsecret"), "{out:?}");
    assert_eq!(out.stdout.trim(), "kilnd.sock", "{out:?}");
    let b_upper = h.cfg.data_dir.join("disk/iso-b/upper/root/secret-b");
    assert!(b_upper.exists());
    let out = sh(&h.rt, "iso-a", &format!("cat {} 2>&1", b_upper.display())).await;
    assert!(!out.stdout.contains("topsecret"), "{out:?}");
    // The kilnd binary is read-only.
    let out = run(
        &h.rt,
        "iso-a",
        &["/bin/sh", "-c", "echo x >> /.kiln/kilnd 2>&1; echo rc=$?"],
    )
    .await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    h.wipe().await;
}
