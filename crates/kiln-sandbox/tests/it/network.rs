//! `full` networking: address, route, reachability of the host on the bridge; `none` has none.

use tokio::io::AsyncReadExt;

use crate::{require_root, sh, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_network_reaches_the_gateway_and_none_does_not() {
    require_root!();
    let h = Harness::new().await;
    let created = h.rt.create(&h.full("net-full")).await.expect("create full");
    let ip = created.ip.clone().expect("an address");
    assert!(ip.starts_with("10.201."), "{ip}");
    h.rt.create(&h.spec("net-none")).await.expect("create none");

    let out = sh(
        &h.rt,
        "net-full",
        "cat /proc/net/route; ls /sys/class/net | tr '\\n' ' '; cat /etc/hosts /etc/resolv.conf",
    )
    .await;
    assert!(
        out.stdout.contains("eth0\t00000000\t0100C90A"),
        "default route via 10.201.0.1: {out:?}"
    );
    assert!(out.stdout.contains("eth0 lo"), "{out:?}");
    assert!(out.stdout.contains(&format!("{ip}\tnet-full")), "{out:?}");
    assert!(out.stdout.contains("nameserver"), "{out:?}");

    // A TCP server on the host, on the gateway address only.
    let listener = tokio::net::TcpListener::bind("10.201.0.1:0")
        .await
        .expect("bind on the bridge");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut conn, peer) = listener.accept().await.expect("accept");
        let mut buf = String::new();
        conn.read_to_string(&mut buf).await.expect("read");
        (peer.ip().to_string(), buf)
    });
    let out = sh(
        &h.rt,
        "net-full",
        &format!("bash -c 'echo hello-from-sandbox > /dev/tcp/10.201.0.1/{port}' && echo sent"),
    )
    .await;
    assert_eq!(out.stdout, "sent\n", "{out:?}");
    let (peer, msg) = tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("timeout")
        .expect("join");
    assert_eq!(peer, ip, "the host sees the sandbox's own address");
    assert_eq!(msg, "hello-from-sandbox\n");

    // The `none` sandbox cannot reach the same server.
    let listener = tokio::net::TcpListener::bind("10.201.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let out = sh(
        &h.rt,
        "net-none",
        &format!("timeout 2 bash -c 'echo x > /dev/tcp/10.201.0.1/{port}' 2>&1; echo rc=$?"),
    )
    .await;
    assert!(!out.stdout.contains("rc=0"), "{out:?}");
    drop(listener);

    // The host can reach a server in the sandbox, but another sandbox cannot (isolated
    // bridge ports).
    let mut srv = h
        .rt
        .client("net-full")
        .exec(kiln_protocol::kilnd::ExecSpec {
            cmd: vec![
                "perl".into(),
                "-MIO::Socket::INET".into(),
                "-e".into(),
                "$l = IO::Socket::INET->new(Listen => 5, LocalPort => 7777, ReuseAddr => 1) or die $!; \
                 while ($c = $l->accept) { print $c \"hi\\n\"; close $c }"
                    .into(),
            ],
            detach: true,
            ..Default::default()
        })
        .await
        .expect("start server");
    assert!(srv.next().await.is_none());
    let mut got = String::new();
    for _ in 0..100 {
        if let Ok(mut c) = tokio::net::TcpStream::connect(format!("{ip}:7777")).await {
            c.read_to_string(&mut got).await.expect("read");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(got, "hi\n", "host -> sandbox");
    let other =
        h.rt.create(&h.full("net-full2"))
            .await
            .expect("create second")
            .ip
            .expect("ip");
    assert_ne!(other, ip);
    let out = sh(
        &h.rt,
        "net-full2",
        &format!("timeout 2 bash -c 'cat < /dev/tcp/{ip}/7777' 2>&1; echo rc=$?"),
    )
    .await;
    assert!(
        !out.stdout.contains("hi") && !out.stdout.contains("rc=0"),
        "sandbox -> sandbox must fail: {out:?}"
    );

    let veth = std::fs::read_to_string(h.cfg.data_dir.join("sandboxes/net-full/kiln.json"))
        .expect("state");
    let veth: serde_json::Value = serde_json::from_str(&veth).expect("json");
    let veth = veth["veth"].as_str().expect("veth").to_string();
    assert!(std::path::Path::new("/sys/class/net").join(&veth).exists());
    h.rt.remove("net-full").await.expect("remove");
    assert!(
        crate::eventually(std::time::Duration::from_secs(5), || !std::path::Path::new(
            "/sys/class/net"
        )
        .join(&veth)
        .exists())
        .await,
        "veth {veth} survived the sandbox"
    );
    assert!(
        !std::path::Path::new("/run/kiln-net/kiln0")
            .join(&ip)
            .exists(),
        "lease released"
    );
    h.wipe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_of_a_none_sandbox_are_listed_and_reachable_through_kilnd() {
    require_root!();
    let h = Harness::new().await;
    h.rt.create(&h.spec("net-ports")).await.expect("create");
    let c = h.rt.client("net-ports");
    let mut srv = c
        .exec(kiln_protocol::kilnd::ExecSpec {
            cmd: vec![
                "perl".into(),
                "-MIO::Socket::INET".into(),
                "-e".into(),
                "$l = IO::Socket::INET->new(Listen => 5, LocalAddr => '127.0.0.1', LocalPort => 8123, ReuseAddr => 1) or die $!; \
                 while ($c = $l->accept) { print $c \"inside\\n\"; close $c }"
                    .into(),
            ],
            detach: true,
            ..Default::default()
        })
        .await
        .expect("start server");
    assert!(srv.next().await.is_none());
    let ports = crate::eventually_value(std::time::Duration::from_secs(10), || async {
        c.list_ports()
            .await
            .ok()
            .filter(|p| p.iter().any(|p| p.port == 8123))
    })
    .await
    .expect("port 8123 appears");
    let p = ports.iter().find(|p| p.port == 8123).expect("8123");
    assert_eq!(p.address, "127.0.0.1");
    assert_eq!(p.command.as_deref(), Some("perl"));
    // The host cannot route to a `none` sandbox, but kilnd can connect for it.
    let mut t = c.connect(8123, None).await.expect("connect");
    let mut got = String::new();
    t.read_to_string(&mut got).await.expect("read");
    assert_eq!(got, "inside\n");
    h.wipe().await;
}
