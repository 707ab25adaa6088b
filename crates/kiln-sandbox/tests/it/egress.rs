//! Egress allow-lists: a `full` sandbox with a list reaches the listed CIDRs and names (names
//! through the host's DNS forwarder), is refused everything else at once (TCP reset, counted),
//! and the list can be changed or lifted on the live sandbox; removal leaves no rules behind.

use kiln_sandbox::egress::EgressAllow;
use tokio::io::AsyncReadExt;

use crate::{require_root, sh, Harness};

fn nft_has(obj: &str, name: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", obj, "inet", "kiln", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lists_admit_listed_destinations_and_refuse_the_rest() {
    require_root!();
    let h = Harness::new().await;
    let dns = h.rt.dns_forwarder().expect("the DNS forwarder runs");
    assert_eq!(dns.to_string(), "10.201.0.1:53");

    let listener = tokio::net::TcpListener::bind("10.201.0.1:0")
        .await
        .expect("bind on the bridge");
    let port = listener.local_addr().expect("addr").port();
    let mut spec = h.full("eg-1");
    spec.egress = Some(EgressAllow {
        domains: vec!["deb.debian.org".into()],
        cidrs: vec!["10.201.0.1".into()],
    });
    h.rt.create(&spec).await.expect("create");
    let id = "eg-1";

    // A listed CIDR: the host's listener on the gateway.
    let server = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.expect("accept");
        let mut s = String::new();
        c.read_to_string(&mut s).await.expect("read");
        s
    });
    let out = sh(
        &h.rt,
        id,
        &format!("bash -c 'echo hi > /dev/tcp/10.201.0.1/{port}' && echo sent"),
    )
    .await;
    assert_eq!(out.stdout, "sent\n", "{out:?}");
    assert_eq!(server.await.expect("join"), "hi\n");

    // A listed name resolves through the forwarder and connects.
    let out = sh(
        &h.rt,
        id,
        "grep nameserver /etc/resolv.conf; getent hosts deb.debian.org >/dev/null && echo resolved; \
         timeout 10 bash -c 'exec 3<>/dev/tcp/deb.debian.org/80' && echo connected",
    )
    .await;
    assert_eq!(
        out.stdout, "nameserver 10.201.0.1\nresolved\nconnected\n",
        "{out:?}"
    );

    // An unlisted name is refused by the forwarder, and an unlisted address by the firewall
    // at once: a reset (exit 1, "Connection refused"), not a timeout (124). The address is
    // the host's own uplink address, with a listener on it (nothing else is reachable here:
    // every outside name resolves to one proxy address, which deb.debian.org made allowed).
    let uplink = {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        u.connect(("deb.debian.org", 80)).expect("route");
        u.local_addr().expect("addr").ip()
    };
    let other = std::net::TcpListener::bind((uplink, 0)).expect("listener on the uplink");
    let other_port = other.local_addr().expect("addr").port();
    std::thread::spawn(move || for _ in other.incoming() {});
    let probe =
        format!("timeout 10 bash -c 'exec 3<>/dev/tcp/{uplink}/{other_port}' 2>&1; echo rc=$?");
    let out = sh(
        &h.rt,
        id,
        &format!("getent hosts pypi.org; echo dns=$?; {probe}"),
    )
    .await;
    assert!(out.stdout.contains("dns=2"), "{out:?}");
    assert!(
        out.stdout.contains("Connection refused") && out.stdout.contains("rc=1"),
        "{out:?}"
    );
    let (list, denied) = h.rt.egress(id).expect("has a list");
    assert_eq!(list.cidrs, vec!["10.201.0.1/32"]);
    assert!(denied >= 1, "denied packets are counted: {denied}");

    // Lifted on the live sandbox: the same address connects.
    h.rt.set_egress(id, None).await.expect("lift");
    assert!(h.rt.egress(id).is_none());
    let out = sh(&h.rt, id, &probe).await;
    assert!(out.stdout.contains("rc=0"), "{out:?}");

    // Restricted again, to the gateway only: the name that was allowed is refused now.
    h.rt.set_egress(
        id,
        Some(EgressAllow {
            domains: vec![],
            cidrs: vec!["10.201.0.1/32".into()],
        }),
    )
    .await
    .expect("restrict");
    let out = sh(&h.rt, id, "getent hosts deb.debian.org; echo dns=$?").await;
    assert!(out.stdout.contains("dns=2"), "{out:?}");

    // Bad lists are refused before anything changes.
    let err =
        h.rt.set_egress(
            id,
            Some(EgressAllow {
                domains: vec!["not a domain".into()],
                cidrs: vec![],
            }),
        )
        .await
        .expect_err("bad domain");
    assert!(err.to_string().contains("not a domain"), "{err}");
    assert!(h.rt.set_egress("eg-missing", None).await.is_err());

    h.rt.remove(id).await.expect("remove");
    assert!(!nft_has("chain", "eg_eg_1"));
    assert!(!nft_has("set", "d_eg_1"));
    assert!(!h.cfg.run_dir.join(".egress/eg-1.json").exists());
    h.wipe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lists_need_full_networking() {
    require_root!();
    let h = Harness::new().await;
    let mut spec = h.spec("eg-none");
    spec.egress = Some(EgressAllow::default());
    let err = h.rt.create(&spec).await.expect_err("none + list");
    assert!(err.to_string().contains("network `full`"), "{err}");
    h.rt.create(&h.spec("eg-none")).await.expect("create");
    let err =
        h.rt.set_egress("eg-none", Some(EgressAllow::default()))
            .await
            .expect_err("none sandbox");
    assert!(err.to_string().contains("network `full`"), "{err}");
    h.wipe().await;
}
