//! The NATS bus against the real NATS server with JetStream (127.0.0.1:4222, started by
//! scripts/ensure-nats.sh): two bus instances with their own connections stand for two Kiln
//! servers; messages arrive once, in order, survive the receiver not listening yet, and
//! `forget` drops the receiver's consumer.

use kiln_agent::bus::{Bus, BusConfig, BusMessage, LocalBus};

fn nats_url() -> String {
    std::env::var("KILN_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn msg(from: &str, text: &str) -> BusMessage {
    BusMessage {
        from: from.into(),
        text: text.into(),
    }
}

async fn exercise(a: &dyn Bus, b: &dyn Bus, tag: &str) {
    let parent = format!("run-{tag}p");
    let child = format!("run-{tag}c");
    // Sent before the receiver ever looked: kept until it does.
    a.send(&child, msg(&parent, "first")).await.expect("send");
    a.send(&child, msg(&parent, "second")).await.expect("send");
    b.send(&parent, msg(&child, "hello parent"))
        .await
        .expect("send");
    assert_eq!(
        b.drain(&child).await,
        vec![msg(&parent, "first"), msg(&parent, "second")]
    );
    // Taken once.
    assert!(b.drain(&child).await.is_empty());
    assert!(a.drain(&child).await.is_empty());
    assert_eq!(a.drain(&parent).await, vec![msg(&child, "hello parent")]);
    assert!(a.send("not/an id", msg(&parent, "x")).await.is_err());
    a.forget(&parent).await;
    b.forget(&child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_and_the_nats_bus_deliver_once_in_order() {
    let local = LocalBus::default();
    // The local bus has no id rules; exercise its delivery only.
    local.send("run-x", msg("p", "1")).await.expect("send");
    local.send("run-x", msg("p", "2")).await.expect("send");
    assert_eq!(
        local.drain("run-x").await,
        vec![msg("p", "1"), msg("p", "2")]
    );
    assert!(local.drain("run-x").await.is_empty());

    let cfg = BusConfig::Nats {
        url: nats_url(),
        subject_prefix: Some("kiln.test.agents".into()),
        stream: Some("KILN_TEST_AGENT_BUS".into()),
    };
    let a = cfg.build();
    let b = cfg.build();
    let tag = format!("{}", kiln_agent::runner::now_ms() % 1_000_000_000);
    exercise(&*a, &*b, &tag).await;

    let bad = BusConfig::Nats {
        url: "nats://127.0.0.1:9".into(),
        subject_prefix: None,
        stream: None,
    }
    .build();
    let e = bad
        .send("run-x", msg("p", "x"))
        .await
        .expect_err("no server");
    assert!(
        e.starts_with("cannot reach NATS at nats://127.0.0.1:9"),
        "{e}"
    );
    assert!(bad.drain("run-x").await.is_empty());
}
