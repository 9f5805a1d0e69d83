//! CONTRACT §11: several real `wsbroker` nodes as one broker over a real
//! `nats-server` (started by the tests on free loopback ports, stopped by pid).

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// The `[cluster]` section of a node.
fn cluster_toml(nats: &str, name: &str, extra: &str) -> String {
    format!(
        "[cluster]\nnats_url = [\"{nats}\"]\nnode_name = \"{name}\"\nunready_after = \"1s\"\n{extra}\n"
    )
}

/// A node connected to `nats` (waits for its link to be up).
async fn node(nats: &NatsServer, name: &str) -> Node {
    // No inbound rate limit: the tests pipeline thousands of publishes.
    let n = Node::start(&cluster_toml(
        &nats.url(),
        name,
        "[connection]\nmax_inbound_rate = 0\n",
    ))
    .await;
    wait_until(WAIT, "the NATS link up", || async {
        metric_of(&n, "wsbroker_cluster_connected").await == 1.0
    })
    .await;
    n
}

/// Waits until nats-server shows exactly `subjects` for the connection `name`.
async fn wait_subs(nats: &NatsServer, name: &str, subjects: &[&str]) {
    let mut want: Vec<String> = subjects.iter().map(|s| s.to_string()).collect();
    want.sort();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = nats.subscriptions_of(name).await;
        if last == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: NATS subscriptions {last:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Next `message` frame (acks and other frames are returned as is).
async fn recv_message(ws: &mut Ws) -> Value {
    recv(ws).await
}

fn message(topic: &str, data: Value) -> Value {
    json!({"type":"message","topic":topic,"data":data})
}

async fn metric_of(node: &Node, series: &str) -> f64 {
    metric(&node.metrics().await, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_nodes_both_ways_and_from_http_publish() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    // A node without clients holds no topic subscriptions.
    wait_subs(&nats, "node-a", &[]).await;

    let mut on_a = a.ws().await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_a, "chat.>", 1).await;
    subscribe(&mut on_b, "chat.room1", 1).await;
    wait_subs(&nats, "node-a", &["wsbroker.chat.>"]).await;
    wait_subs(&nats, "node-b", &["wsbroker.chat.room1"]).await;

    // A -> B (and A's own subscriber gets it once, locally).
    let mut pub_a = a.ws().await;
    publish(&mut pub_a, "chat.room1", json!({"n":1,"s":"x y"}), 7).await;
    assert_eq!(
        recv_message(&mut on_b).await,
        message("chat.room1", json!({"n":1,"s":"x y"}))
    );
    assert_eq!(
        recv_message(&mut on_a).await,
        message("chat.room1", json!({"n":1,"s":"x y"}))
    );

    // B -> A, data byte-for-byte (spacing and key order kept).
    let mut pub_b = b.ws().await;
    let raw = r#"{"op":"publish","topic":"chat.other","data":{ "z" :1,"a":[ 2 ]},"id":1}"#;
    futures_util::SinkExt::send(
        &mut pub_b,
        tokio_tungstenite::tungstenite::Message::Text(raw.into()),
    )
    .await
    .expect("send");
    assert_eq!(recv(&mut pub_b).await, json!({"type":"ack","id":1}));
    assert_eq!(
        recv_text(&mut on_a).await,
        r#"{"type":"message","topic":"chat.other","data":{ "z" :1,"a":[ 2 ]}}"#
    );

    // POST /publish on B reaches A; `delivered` counts B's queues only.
    let resp = b.http_publish("chat.room1", json!("via http")).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with(r#"{"delivered":1}"#), "{resp}");
    assert_eq!(
        recv_message(&mut on_a).await,
        message("chat.room1", json!("via http"))
    );
    assert_eq!(
        recv_message(&mut on_b).await,
        message("chat.room1", json!("via http"))
    );

    // Nothing arrives twice.
    expect_silence(&mut on_a, Duration::from_millis(300)).await;
    expect_silence(&mut on_b, Duration::from_millis(300)).await;

    let m = a.metrics().await;
    assert_eq!(metric(&m, "wsbroker_cluster_connected"), 1.0);
    assert_eq!(metric(&m, "wsbroker_cluster_subscriptions"), 1.0);
    assert!(metric(&m, "wsbroker_cluster_messages_sent_total") >= 1.0);
    assert!(metric(&m, "wsbroker_cluster_messages_received_total") >= 2.0);
    let (code, body) = a.readyz().await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_patterns_deliver_exactly_once_on_every_node() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let patterns = ["a.*", "a.>", "a.b", ">", "*.b"];
    // One connection holding all of them, and one per pattern, on both nodes.
    let mut all = Vec::new();
    let mut single = Vec::new();
    for n in [&a, &b] {
        let mut ws = n.ws().await;
        for (i, p) in patterns.iter().enumerate() {
            subscribe(&mut ws, p, i as u64).await;
        }
        all.push(ws);
        for p in patterns {
            let mut ws = n.ws().await;
            subscribe(&mut ws, p, 1).await;
            single.push(ws);
        }
    }
    let subjects: Vec<String> = patterns.iter().map(|p| format!("wsbroker.{p}")).collect();
    let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
    wait_subs(&nats, "node-a", &subjects).await;
    wait_subs(&nats, "node-b", &subjects).await;

    let mut pub_a = a.ws().await;
    for i in 0..20 {
        publish(&mut pub_a, "a.b", json!(i), i).await;
    }
    for ws in all.iter_mut().chain(single.iter_mut()) {
        for i in 0..20 {
            assert_eq!(recv_message(ws).await, message("a.b", json!(i)));
        }
        expect_silence(ws, Duration::from_millis(200)).await;
    }
    // Received once per message, not once per matching subscription.
    assert_eq!(
        metric_of(&b, "wsbroker_cluster_messages_received_total").await,
        20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_messages_arrive_in_order_across_nodes() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut ws = b.ws().await;
        subscribe(&mut ws, "seq.>", 1).await;
        subs.push(ws);
    }
    wait_subs(&nats, "node-b", &["wsbroker.seq.>"]).await;
    const N: u64 = 3000;
    let mut pub_a = a.ws().await;
    // Pipelined: all frames first, then the acks.
    let sender = tokio::spawn(async move {
        for i in 0..N {
            send(
                &mut pub_a,
                json!({"op":"publish","topic":"seq.x","data":{"i":i}}),
            )
            .await;
        }
        pub_a
    });
    for ws in subs.iter_mut() {
        for i in 0..N {
            let m = recv_message(ws).await;
            assert_eq!(m["data"]["i"], json!(i), "out of order or lost");
        }
    }
    let _ = sender.await;
}

/// One publisher's messages to topics that a remote subscriber holds
/// through different patterns (so they reach its node on different NATS
/// subscriptions) still arrive in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_across_topics_held_through_different_patterns() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut sub = b.ws().await;
    for (i, p) in ["p.x", "p.y.*", "p.z.>", "q.*"].iter().enumerate() {
        subscribe(&mut sub, p, i as u64 + 1).await;
    }
    wait_subs(
        &nats,
        "node-b",
        &[
            "wsbroker.p.x",
            "wsbroker.p.y.*",
            "wsbroker.p.z.>",
            "wsbroker.q.*",
        ],
    )
    .await;
    const N: u64 = 4000;
    const TOPICS: [&str; 4] = ["p.x", "p.y.1", "p.z.a.b", "q.r"];
    let mut pub_a = a.ws().await;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let topic = TOPICS[(i % 4) as usize];
            send(
                &mut pub_a,
                json!({"op":"publish","topic":topic,"data":{"i":i}}),
            )
            .await;
        }
        pub_a
    });
    for i in 0..N {
        let m = recv_message(&mut sub).await;
        assert_eq!(m["data"]["i"], json!(i), "out of order or lost: {m}");
        assert_eq!(m["topic"], TOPICS[(i % 4) as usize]);
    }
    let _ = sender.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_follows_local_patterns_in_nats_connz() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    wait_subs(&nats, "node-a", &[]).await;
    let mut c1 = a.ws().await;
    let mut c2 = a.ws().await;
    subscribe(&mut c1, "x.*", 1).await;
    subscribe(&mut c2, "x.*", 1).await;
    subscribe(&mut c2, "y.z", 2).await;
    wait_subs(&nats, "node-a", &["wsbroker.x.*", "wsbroker.y.z"]).await;
    assert_eq!(metric_of(&a, "wsbroker_cluster_subscriptions").await, 2.0);
    // The pattern stays while one local subscriber holds it.
    send(&mut c1, json!({"op":"unsubscribe","topic":"x.*","id":3})).await;
    assert_eq!(recv(&mut c1).await, json!({"type":"ack","id":3}));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_subs(&nats, "node-a", &["wsbroker.x.*", "wsbroker.y.z"]).await;
    // The last subscriber leaving (a closed connection) drops both, after the delay.
    drop(c2);
    wait_subs(&nats, "node-a", &[]).await;
    assert_eq!(metric_of(&a, "wsbroker_cluster_subscriptions").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_nats_clients_publish_and_listen() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let client = async_nats::connect(nats.url()).await.expect("nats client");
    let mut listener = client.subscribe("wsbroker.news.>").await.expect("sub");
    client.flush().await.expect("flush");

    let mut ws = a.ws().await;
    subscribe(&mut ws, "news.*", 1).await;
    wait_subs(&nats, "node-a", &["wsbroker.news.*"]).await;

    // NATS -> WebSocket: the body is the data, byte-for-byte.
    client
        .publish("wsbroker.news.today", r#"{"headline": "x"}"#.into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    assert_eq!(
        recv_text(&mut ws).await,
        r#"{"type":"message","topic":"news.today","data":{"headline": "x"}}"#
    );
    // WebSocket -> NATS: raw data bytes, with the node's header.
    let mut pubber = a.ws().await;
    publish(&mut pubber, "news.today", json!([1, 2]), 5).await;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            let m = listener.next().await.expect("stream");
            if &m.payload[..] == b"[1,2]" {
                return m;
            }
        }
    })
    .await
    .expect("NATS listener got the WebSocket publish");
    assert_eq!(got.subject.as_str(), "wsbroker.news.today");
    let node_id = got
        .headers
        .as_ref()
        .and_then(|h| h.get("Wsbroker-Node"))
        .map(|v| v.as_str().to_string())
        .expect("Wsbroker-Node header");
    assert!(node_id.starts_with("node-a-"), "{node_id}");
    // The subscriber on the node got its copy once (locally).
    assert_eq!(
        recv_message(&mut ws).await,
        message("news.today", json!([1, 2]))
    );

    // Bad bodies are dropped and counted; the good one after them arrives.
    for bad in ["not json", "{\"a\":", "", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"] {
        client
            .publish("wsbroker.news.today", bad.to_string().into())
            .await
            .expect("publish");
    }
    client
        .publish("wsbroker.news.today", "\"ok\"".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    assert_eq!(
        recv_message(&mut ws).await,
        message("news.today", json!("ok"))
    );
    expect_silence(&mut ws, Duration::from_millis(200)).await;
    let m = a.metrics().await;
    assert_eq!(
        metric(&m, r#"wsbroker_cluster_errors_total{reason="bad_payload"}"#),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_on_the_same_port() {
    let mut nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let mut on_a = a.ws().await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_a, "k.*", 1).await;
    subscribe(&mut on_b, "k.*", 1).await;
    subscribe(&mut on_b, "k.>", 2).await;
    wait_subs(&nats, "node-b", &["wsbroker.k.*", "wsbroker.k.>"]).await;
    wait_subs(&nats, "node-a", &["wsbroker.k.*"]).await;

    nats.kill();
    wait_until(WAIT, "cluster_connected 0", || async {
        metric_of(&a, "wsbroker_cluster_connected").await == 0.0
    })
    .await;
    // Local clients are still served; what cannot be forwarded is counted.
    let mut pub_a = a.ws().await;
    publish(&mut pub_a, "k.local", json!("while down"), 1).await;
    assert_eq!(
        recv_message(&mut on_a).await,
        message("k.local", json!("while down"))
    );
    wait_until(WAIT, "publish_failed counted", || async {
        metric_of(
            &a,
            r#"wsbroker_cluster_errors_total{reason="publish_failed"}"#,
        )
        .await
            >= 1.0
    })
    .await;
    // /readyz says why, once unready_after (1s) has passed.
    wait_until(WAIT, "readyz 503", || async { a.readyz().await.0 == 503 }).await;
    let (_, body) = a.readyz().await;
    assert!(
        body.contains("NATS link down") && body.contains("node-a"),
        "{body}"
    );

    nats.restart().await;
    wait_until(Duration::from_secs(20), "reconnected", || async {
        metric_of(&a, "wsbroker_cluster_connected").await == 1.0
            && metric_of(&b, "wsbroker_cluster_connected").await == 1.0
    })
    .await;
    // Every subscription is restored.
    wait_subs(&nats, "node-b", &["wsbroker.k.*", "wsbroker.k.>"]).await;
    wait_subs(&nats, "node-a", &["wsbroker.k.*"]).await;
    assert_eq!(a.readyz().await.0, 200);
    assert_eq!(
        metric_of(&a, "wsbroker_cluster_reconnects_total").await,
        1.0
    );
    publish(&mut pub_a, "k.after", json!("back"), 2).await;
    assert_eq!(
        recv_message(&mut on_b).await,
        message("k.after", json!("back"))
    );
    assert_eq!(
        recv_message(&mut on_a).await,
        message("k.after", json!("back"))
    );
    expect_silence(&mut on_b, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_leaves_the_others_working() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let mut b = node(&nats, "node-b").await;
    let c = node(&nats, "node-c").await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_b, "t", 1).await;
    let mut on_c = c.ws().await;
    subscribe(&mut on_c, "t", 1).await;
    wait_subs(&nats, "node-b", &["wsbroker.t"]).await;
    wait_subs(&nats, "node-c", &["wsbroker.t"]).await;
    b.kill();
    // nats-server forgets the dead node's subscriptions.
    wait_until(WAIT, "node-b gone from connz", || async {
        let connz = nats.monitor("/connz").await;
        !connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "node-b")
    })
    .await;
    drop(on_b);
    let mut pub_a = a.ws().await;
    for i in 0..10 {
        publish(&mut pub_a, "t", json!(i), i).await;
    }
    for i in 0..10 {
        assert_eq!(recv_message(&mut on_c).await, message("t", json!(i)));
    }
    assert_eq!(metric_of(&a, "wsbroker_cluster_connected").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_nats_serves_locally_and_joins_later() {
    let (port, monitor) = (free_port(), free_port());
    let url = format!("nats://127.0.0.1:{port}");
    let a = Node::start(&cluster_toml(&url, "node-a", "")).await;
    let mut on_a = a.ws().await;
    subscribe(&mut on_a, "early", 1).await;
    let mut pub_a = a.ws().await;
    publish(&mut pub_a, "early", json!(1), 1).await;
    assert_eq!(recv_message(&mut on_a).await, message("early", json!(1)));
    assert_eq!(metric_of(&a, "wsbroker_cluster_connected").await, 0.0);
    wait_until(WAIT, "readyz 503", || async { a.readyz().await.0 == 503 }).await;

    let nats = NatsServer::start_on(port, monitor, &[]).await;
    let b = node(&nats, "node-b").await;
    wait_until(Duration::from_secs(20), "node-a joined", || async {
        metric_of(&a, "wsbroker_cluster_connected").await == 1.0
    })
    .await;
    // The subscription taken before NATS was up is there.
    wait_subs(&nats, "node-a", &["wsbroker.early"]).await;
    assert_eq!(a.readyz().await.0, 200);
    let mut pub_b = b.ws().await;
    publish(&mut pub_b, "early", json!(2), 1).await;
    assert_eq!(recv_message(&mut on_a).await, message("early", json!(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_nats_connection() {
    let nats = NatsServer::start(&["--user", "broker", "--pass", "s3cret"]).await;
    let auth = "nats_user = \"broker\"\nnats_password = \"s3cret\"\n";
    let a = Node::start(&cluster_toml(&nats.url(), "node-a", auth)).await;
    let b = Node::start(&cluster_toml(&nats.url(), "node-b", auth)).await;
    let wrong = Node::start(&cluster_toml(
        &nats.url(),
        "node-wrong",
        "nats_user = \"broker\"\nnats_password = \"nope\"\n",
    ))
    .await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_b, "secure", 1).await;
    wait_until(WAIT, "both connected", || async {
        metric_of(&a, "wsbroker_cluster_connected").await == 1.0
            && metric_of(&b, "wsbroker_cluster_connected").await == 1.0
    })
    .await;
    wait_subs(&nats, "node-b", &["wsbroker.secure"]).await;
    let mut pub_a = a.ws().await;
    publish(&mut pub_a, "secure", json!("ok"), 1).await;
    assert_eq!(
        recv_message(&mut on_b).await,
        message("secure", json!("ok"))
    );
    // The node with the wrong password is not in; /readyz says so.
    wait_until(WAIT, "wrong node unready", || async {
        wrong.readyz().await.0 == 503
    })
    .await;
    let (_, body) = wrong.readyz().await;
    assert!(body.contains("NATS link down"), "{body}");
    assert_eq!(metric_of(&wrong, "wsbroker_cluster_connected").await, 0.0);
}

/// `check-config` on a file with the given `[cluster]` lines: (exit code, stderr).
fn check_config(cluster: &str) -> (i32, String) {
    let cert = make_cert();
    let path = cert.dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[cluster]\n{cluster}\n",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_validates_the_cluster_section() {
    let (code, err) = check_config("nats_url = [\"nats://10.0.0.5:4222\", \"tls://nats.example.com:4222\"]\nsubject_prefix = \"app.ws\"\nunready_after = \"0s\"");
    assert_eq!(code, 0, "{err}");
    let (code, err) = check_config(
        "nats_url = [\"http://x:4222\", \"nats://\"]\nsubject_prefix = \"ws.*\"\nnats_creds = \"/nonexistent/x.creds\"\nnats_ca = \"/nonexistent/ca.pem\"\nunready_after = \"soon\"\nbogus = 1",
    );
    assert_eq!(code, 1, "{err}");
    for key in [
        "cluster.nats_url[0]: ",
        "cluster.nats_url[1]: ",
        "cluster.subject_prefix: ",
        "cluster.nats_creds: file not found",
        "cluster.nats_ca: file not found",
        "cluster.unready_after: ",
        "cluster.bogus: unknown key",
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(key)),
            "no `{key}` in:\n{err}"
        );
    }
    // A file that is not a credentials file, a CA file without a certificate.
    let dir = tempfile::tempdir().expect("tmp");
    let creds = dir.path().join("bad.creds");
    std::fs::write(&creds, "hello").expect("write");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a pem").expect("write");
    let (code, err) = check_config(&format!(
        "nats_url = [\"tls://127.0.0.1:4222\"]\nnats_creds = \"{}\"\nnats_ca = \"{}\"",
        creds.display(),
        ca.display()
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("cluster.nats_creds: ")),
        "{err}"
    );
    assert!(
        err.lines().any(|l| l.starts_with("cluster.nats_ca: ")),
        "{err}"
    );
}

/// `wsbroker bench` with several `--url`s: subscribers round-robin over the
/// nodes, publishers on the first; nothing is lost across the NATS leg.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_spreads_subscribers_over_several_nodes() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    let ca = a.cert.dir.path().join("both.pem");
    std::fs::write(
        &ca,
        [
            std::fs::read_to_string(&a.cert.cert_path).expect("cert a"),
            std::fs::read_to_string(&b.cert.cert_path).expect("cert b"),
        ]
        .concat(),
    )
    .expect("write ca");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wsbroker"));
    cmd.args(["bench", "--url"])
        .arg(format!("wss://localhost:{}/ws", a.addr.port()))
        .arg("--url")
        .arg(format!("wss://localhost:{}/ws", b.addr.port()))
        .args(["--origin", ORIGIN, "--ca"])
        .arg(&ca)
        .args(["--subscribers", "20", "--rate", "500", "--duration", "2s"]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["lost"], json!(0), "{report}");
    assert!(
        report["delivered"].as_u64().unwrap_or(0) >= 20 * 900,
        "{report}"
    );
    // Half of the subscribers were on node-b, fed through NATS.
    let b_delivered = metric(&b.metrics().await, "wsbroker_messages_delivered_total");
    assert!(
        b_delivered >= 10.0 * 900.0,
        "node-b delivered {b_delivered}"
    );
    let received = metric_of(&b, "wsbroker_cluster_messages_received_total").await;
    assert!(received >= 900.0, "node-b received {received} from NATS");
}

/// `tls://` with `nats_ca` (the test's own CA) and token authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_token_to_nats() {
    let cert = make_cert();
    let cert_path = cert.cert_path.display().to_string();
    let key_path = cert.key_path.display().to_string();
    let nats = NatsServer::start(&[
        "--tls",
        "--tlscert",
        &cert_path,
        "--tlskey",
        &key_path,
        "--auth",
        "t0ken",
    ])
    .await;
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let extra = format!("nats_token = \"t0ken\"\nnats_ca = \"{cert_path}\"\n");
    let a = Node::start(&cluster_toml(&url, "node-a", &extra)).await;
    let b = Node::start(&cluster_toml(&url, "node-b", &extra)).await;
    wait_until(WAIT, "both connected over TLS", || async {
        metric_of(&a, "wsbroker_cluster_connected").await == 1.0
            && metric_of(&b, "wsbroker_cluster_connected").await == 1.0
    })
    .await;
    let mut on_b = b.ws().await;
    subscribe(&mut on_b, "tls.x", 1).await;
    wait_subs(&nats, "node-b", &["wsbroker.tls.x"]).await;
    let connz = nats.monitor("/connz").await;
    let tls_version = connz["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "node-b")
        .map(|c| c["tls_version"].clone());
    assert!(
        tls_version
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("1.")),
        "node-b's NATS connection is not TLS: {tls_version:?}"
    );
    let mut pub_a = a.ws().await;
    publish(&mut pub_a, "tls.x", json!({"secure":true}), 1).await;
    assert_eq!(
        recv_message(&mut on_b).await,
        message("tls.x", json!({"secure":true}))
    );
    // Without the CA the node cannot verify the server and stays out.
    let untrusting = Node::start(&cluster_toml(&url, "node-c", "nats_token = \"t0ken\"\n")).await;
    wait_until(WAIT, "untrusting node unready", || async {
        untrusting.readyz().await.0 == 503
    })
    .await;
    assert_eq!(
        metric_of(&untrusting, "wsbroker_cluster_connected").await,
        0.0
    );
}

/// What arrives from NATS faster than the node can deliver it is dropped
/// and counted (`slow_consumer`), in bounded memory, and the node keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_nats_is_dropped_and_counted_as_slow_consumer() {
    let nats = NatsServer::start(&[]).await;
    let a = node(&nats, "node-a").await;
    // Many local subscribers make each message from NATS cost a fan-out.
    let mut subs = Vec::new();
    for _ in 0..200 {
        let mut ws = a.ws().await;
        subscribe(&mut ws, "flood", 1).await;
        subs.push(ws);
    }
    wait_subs(&nats, "node-a", &["wsbroker.flood"]).await;
    // The test's subscribers are not read during the flood: their outboxes
    // overflow (drop_oldest), which never slows the node's NATS reader.
    let client = async_nats::connect(nats.url()).await.expect("nats client");
    const N: u64 = 60_000;
    for i in 0..N {
        client
            .publish("wsbroker.flood", format!("{i}").into())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    wait_until(Duration::from_secs(30), "slow_consumer counted", || async {
        metric_of(
            &a,
            r#"wsbroker_cluster_errors_total{reason="slow_consumer"}"#,
        )
        .await
            > 0.0
    })
    .await;
    // Once the node has worked through what it kept, every message is
    // either received or counted as dropped.
    let counts = || async {
        let m = a.metrics().await;
        (
            metric(&m, "wsbroker_cluster_messages_received_total"),
            metric(
                &m,
                r#"wsbroker_cluster_errors_total{reason="slow_consumer"}"#,
            ),
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = counts().await;
    while last.0 + last.1 < N as f64 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = counts().await;
    }
    let (received, dropped) = last;
    eprintln!("flood: received {received}, slow_consumer {dropped} of {N}");
    // All of it fits in the client's per-subscription buffer (65,536), so
    // the count is exact: delivered or counted, nothing else.
    assert_eq!(
        received + dropped,
        N as f64,
        "received {received}, dropped {dropped}"
    );
    assert!(dropped > 0.0, "nothing dropped: the flood did not overflow");
    // Still serving: a fresh subscriber gets a message published on NATS.
    let mut fresh = a.ws().await;
    subscribe(&mut fresh, "after", 1).await;
    wait_subs(&nats, "node-a", &["wsbroker.after", "wsbroker.flood"]).await;
    client
        .publish("wsbroker.after", "\"still here\"".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    assert_eq!(
        recv_message(&mut fresh).await,
        message("after", json!("still here"))
    );
    drop(subs);
}
