//! Authentication and per-topic permissions (CONTRACT §10, issue 13), end
//! to end over real TLS with tokens minted here with real keys of every
//! type.

mod common;

use std::time::Duration;

use common::auth::{
    claims, hmac_token, none_token, now, raw_upgrade, write, ws_bearer, ws_with, Signer, SECRET,
};
use common::{expect_close, expect_silence, metric, recv, send, subscribe, TestServer, Ws};
use serde_json::json;

/// A jwt-mode server with the given extra overrides; the key files are
/// written beside its config.
async fn jwt_server(overrides: &[(&str, &str)]) -> TestServer {
    let mut all = vec![("WSBROKER__AUTH__MODE", "jwt")];
    all.extend_from_slice(overrides);
    TestServer::start(&all).await
}

/// The path of a file in a fresh temp dir that outlives the test.
fn temp_file(name: &str, text: &str) -> String {
    let dir = Box::leak(Box::new(tempfile::tempdir().expect("tempdir")));
    write(dir.path(), name, text).display().to_string()
}

fn secret_file() -> String {
    temp_file("secret", &format!("{}\n", String::from_utf8_lossy(SECRET)))
}

/// Status line and body of a raw response.
fn status(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

async fn expect_401(server: &TestServer, extra: &str, body_has: &str) -> String {
    let resp = raw_upgrade(server, "/ws", extra).await;
    assert!(
        status(&resp).contains(" 401 "),
        "expected 401, got:\n{resp}"
    );
    assert!(
        resp.contains("WWW-Authenticate: Bearer error=\"invalid_token\""),
        "{resp}"
    );
    assert!(
        resp.contains(body_has),
        "401 body should say `{body_has}`:\n{resp}"
    );
    resp
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

async fn sub_result(ws: &mut Ws, topic: &str, id: u64) -> serde_json::Value {
    send(ws, json!({"op":"subscribe","topic":topic,"id":id})).await;
    recv(ws).await
}

async fn pub_result(ws: &mut Ws, topic: &str, id: u64) -> serde_json::Value {
    send(
        ws,
        json!({"op":"publish","topic":topic,"data":{"n":id},"id":id}),
    )
    .await;
    recv(ws).await
}

fn is_ack(v: &serde_json::Value, id: u64) -> bool {
    v["type"] == "ack" && v["id"] == id
}

fn is_error(v: &serde_json::Value, id: u64, code: &str) -> bool {
    v["type"] == "error" && v["id"] == id && v["code"] == code
}

#[tokio::test]
async fn every_algorithm_verifies_with_its_key_type() {
    let rsa = Signer::rsa("RS256");
    let p256 = Signer::es256();
    let p384 = Signer::es384();
    let ed = Signer::ed25519();
    let secret = secret_file();
    // RSA and Ed25519 as SPKI keys, the EC keys as X.509 certificates.
    let keys = format!(
        "{},{},{},{}",
        temp_file("rsa.pem", &rsa.public_pem),
        temp_file("p256.pem", p256.cert_pem.as_deref().expect("cert")),
        temp_file("p384.pem", p384.cert_pem.as_deref().expect("cert")),
        temp_file("ed.pem", &ed.public_pem),
    );
    let server = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__PUBLIC_KEYS", &keys),
    ])
    .await;
    let mut signers: Vec<Signer> = ["HS256", "HS384", "HS512"]
        .iter()
        .map(|a| Signer::hmac(a, SECRET))
        .collect();
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        signers.push(Signer::rsa(alg));
    }
    signers.extend([p256, p384, ed]);
    for s in &signers {
        let token = s.sign(&claims("u1", 300, &["t.>"], &["t.x"]));
        let mut ws = ws_bearer(&server, &token).await;
        assert!(is_ack(&sub_result(&mut ws, "t.a", 1).await, 1), "{}", s.alg);
        assert!(
            is_error(&sub_result(&mut ws, "other", 2).await, 2, "forbidden"),
            "{}",
            s.alg
        );
    }
    // A key of another type than the algorithm never verifies: an ES256
    // signature presented as ES384 (the P-384 key refuses it, the P-256
    // key is not asked).
    let es = Signer::es256();
    let header = json!({"alg":"ES384"});
    let forged = es.sign_with_header(&header, &claims("u1", 300, &[], &[]));
    expect_401(&server, &bearer(&forged), "").await;
}

#[tokio::test]
async fn algorithm_confusion_and_none_are_refused() {
    let rsa = Signer::rsa("RS256");
    let keys = temp_file("rsa.pem", &rsa.public_pem);
    let server = jwt_server(&[("WSBROKER__AUTH__PUBLIC_KEYS", &keys)]).await;
    let c = claims("u1", 300, &[">"], &[">"]);
    // HS256 "signed" with the RSA public key's PEM bytes as the secret.
    let confused = hmac_token("HS256", rsa.public_pem.as_bytes(), &c);
    expect_401(&server, &bearer(&confused), "unknown key").await;
    // The same with a DER-less variant of the PEM (no trailing newline).
    let confused = hmac_token("HS256", rsa.public_pem.trim_end().as_bytes(), &c);
    expect_401(&server, &bearer(&confused), "unknown key").await;
    // alg none, with and without a signature part.
    expect_401(&server, &bearer(&none_token(&c)), "algorithm `none`").await;
    // A good RS256 token still works.
    let mut ws = ws_bearer(&server, &rsa.sign(&c)).await;
    assert!(is_ack(&sub_result(&mut ws, "x", 1).await, 1));
    let m = server.metrics().await;
    assert!(metric(&m, r#"wsbroker_handshake_rejected_total{reason="auth"}"#) >= 3.0);
    assert!(metric(&m, r#"wsbroker_auth_rejected_total{reason="unknown_key"}"#) >= 2.0);
    assert!(metric(&m, r#"wsbroker_auth_rejected_total{reason="invalid"}"#) >= 1.0);
}

#[tokio::test]
async fn claims_are_checked() {
    let secret = secret_file();
    let server = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__ISSUER", "https://idp.example"),
        ("WSBROKER__AUTH__AUDIENCE", "wsbroker"),
        ("WSBROKER__AUTH__LEEWAY", "30s"),
    ])
    .await;
    let hs = Signer::hmac("HS256", SECRET);
    let base = |extra: serde_json::Value| {
        let mut c = json!({"sub":"u1","exp": now() + 300, "iss":"https://idp.example",
                           "aud":"wsbroker", "wsbroker":{"subscribe":["a.>"]}});
        for (k, v) in extra.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    // Accepted: the baseline, aud as an array, expired but within leeway.
    for ok in [
        base(json!({})),
        base(json!({"aud":["other","wsbroker"]})),
        base(json!({"exp": now() - 10})),
        base(json!({"nbf": now() + 10})),
    ] {
        let mut ws = ws_bearer(&server, &hs.sign(&ok)).await;
        assert!(is_ack(&sub_result(&mut ws, "a.b", 1).await, 1), "{ok}");
    }
    let cases = [
        (base(json!({"exp": now() - 60})), "token expired"),
        (base(json!({"nbf": now() + 120})), "not yet valid"),
        (base(json!({"iss":"https://evil.example"})), "wrong issuer"),
        (base(json!({"iss":null})), "wrong issuer"),
        (base(json!({"aud":"other"})), "wrong audience"),
        (base(json!({"aud":["x","y"]})), "wrong audience"),
        (base(json!({"sub":null})), "`sub` is missing"),
        (base(json!({"sub":42})), "`sub` is not"),
        (base(json!({"exp":null})), "`exp` is missing"),
        (base(json!({"exp":"9999999999"})), "`exp` is not a number"),
        (base(json!({"nbf":"0"})), "`nbf` is not a number"),
        (base(json!({"wsbroker":{"subscribe":"a.>"}})), "not a list"),
        (base(json!({"wsbroker":{"publish":["a..b"]}})), "not a list"),
        (base(json!({"wsbroker":{"subscribe":[1]}})), "not a list"),
        (base(json!({"wsbroker":["a"]})), "not an object"),
    ];
    for (c, why) in cases {
        expect_401(&server, &bearer(&hs.sign(&c)), why).await;
    }
    // A tampered payload: bad signature.
    let token = hs.sign(&base(json!({})));
    let parts: Vec<&str> = token.split('.').collect();
    let other = hs.sign(&base(json!({"sub":"admin"})));
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap_or(""),
        parts[2]
    );
    expect_401(&server, &bearer(&forged), "bad signature").await;
    expect_401(&server, &bearer("not-a-jwt"), "malformed token").await;
    // An algorithm for which no key is configured.
    expect_401(
        &server,
        &bearer(&Signer::es256().sign(&base(json!({})))),
        "unknown key",
    )
    .await;
    let m = server.metrics().await;
    assert!(metric(&m, r#"wsbroker_auth_rejected_total{reason="expired"}"#) >= 1.0);
}

#[tokio::test]
async fn every_way_of_presenting_a_token() {
    let secret = secret_file();
    let server = jwt_server(&[("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret)]).await;
    let hs = Signer::hmac("HS256", SECRET);
    let token = hs.sign(&claims("u1", 300, &["a"], &[]));
    // 1. Authorization header.
    let mut ws = ws_bearer(&server, &token).await;
    assert!(is_ack(&sub_result(&mut ws, "a", 1).await, 1));
    // 2. The subprotocol list: wsbroker.v1 is selected, the token never echoed.
    let proto = format!("wsbroker.v1, wsbroker.bearer.{token}");
    let (mut ws, selected) = ws_with(&server, "/ws", &[("Sec-WebSocket-Protocol", &proto)])
        .await
        .expect("subprotocol token");
    assert_eq!(selected.as_deref(), Some("wsbroker.v1"));
    assert!(is_ack(&sub_result(&mut ws, "a", 1).await, 1));
    let raw = raw_upgrade(
        &server,
        "/ws",
        &format!("Sec-WebSocket-Protocol: {proto}\r\n"),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 101"), "{raw}");
    assert!(!raw.contains(&token), "the token is echoed:\n{raw}");
    // 3. The query: refused (401 saying so) unless allow_query_token.
    let resp = raw_upgrade(&server, &format!("/ws?token={token}"), "").await;
    assert!(status(&resp).contains(" 401 "), "{resp}");
    assert!(resp.contains("allow_query_token"), "{resp}");
    assert!(!resp.contains(&token), "{resp}");
    // A bad subprotocol token: 401, never anonymous.
    let bad = format!("wsbroker.v1, wsbroker.bearer.{}x", token);
    expect_401(
        &server,
        &format!("Sec-WebSocket-Protocol: {bad}\r\n"),
        "bad signature",
    )
    .await;
    // Two tokens at once: refused.
    expect_401(
        &server,
        &format!("{}Sec-WebSocket-Protocol: {proto}\r\n", bearer(&token)),
        "more than one token",
    )
    .await;
    // 4. The auth op on an anonymous connection.
    let (mut ws, _) = ws_with(&server, "/ws", &[]).await.expect("anonymous");
    assert!(is_error(&sub_result(&mut ws, "a", 1).await, 1, "forbidden"));
    send(&mut ws, json!({"op":"auth","token":token,"id":2})).await;
    let ack = recv(&mut ws).await;
    assert!(is_ack(&ack, 2), "{ack}");
    assert!(ack["exp"].as_i64().is_some_and(|e| e > now()), "{ack}");
    assert!(is_ack(&sub_result(&mut ws, "a", 3).await, 3));

    let open = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__ALLOW_QUERY_TOKEN", "true"),
    ])
    .await;
    let (mut ws, _) = ws_with(&open, &format!("/ws?token={token}"), &[])
        .await
        .expect("query token allowed");
    assert!(is_ack(&sub_result(&mut ws, "a", 1).await, 1));
    // The query never decides the path match.
    let resp = raw_upgrade(&open, &format!("/other?token={token}"), "").await;
    assert!(status(&resp).contains(" 404 "), "{resp}");
}

#[tokio::test]
async fn mode_none_ignores_tokens_and_acks_auth_unchecked() {
    let server = TestServer::start(&[]).await;
    let (mut ws, selected) = ws_with(
        &server,
        "/ws?token=garbage",
        &[
            ("Authorization", "Bearer garbage"),
            (
                "Sec-WebSocket-Protocol",
                "wsbroker.v1, wsbroker.bearer.garbage",
            ),
        ],
    )
    .await
    .expect("tokens are ignored in mode none");
    assert_eq!(selected.as_deref(), Some("wsbroker.v1"));
    send(&mut ws, json!({"op":"auth","token":"garbage","id":1})).await;
    assert_eq!(recv(&mut ws).await, json!({"type":"ack","id":1}));
    subscribe(&mut ws, "any.topic", 2).await;
}

#[tokio::test]
async fn anonymous_lists_and_forbidden_publish_reaches_nobody() {
    let secret = secret_file();
    let server = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__ANONYMOUS_SUBSCRIBE", "public.>"),
        ("WSBROKER__AUTH__ANONYMOUS_PUBLISH", "public.chat"),
        ("WSBROKER__AUTH__AUTH_TIMEOUT", "1s"),
    ])
    .await;
    let hs = Signer::hmac("HS256", SECRET);
    let mut reader = ws_bearer(&server, &hs.sign(&claims("r", 300, &[">"], &[]))).await;
    subscribe(&mut reader, "public.>", 1).await;
    subscribe(&mut reader, "private.x", 2).await;
    let (mut anon, _) = ws_with(&server, "/ws", &[]).await.expect("anonymous");
    assert!(is_ack(&sub_result(&mut anon, "public.news", 1).await, 1));
    assert!(is_ack(&sub_result(&mut anon, "public.*", 2).await, 2));
    assert!(is_error(
        &sub_result(&mut anon, "private.x", 3).await,
        3,
        "forbidden"
    ));
    assert!(is_error(
        &sub_result(&mut anon, ">", 4).await,
        4,
        "forbidden"
    ));
    assert!(is_error(
        &pub_result(&mut anon, "private.x", 5).await,
        5,
        "forbidden"
    ));
    assert!(is_error(
        &pub_result(&mut anon, "public.other", 6).await,
        6,
        "forbidden"
    ));
    assert!(is_ack(&pub_result(&mut anon, "public.chat", 7).await, 7));
    // It is subscribed to public.* itself.
    assert_eq!(recv(&mut anon).await["topic"], "public.chat");
    // The permitted publish arrives; the forbidden ones reached nobody.
    let got = recv(&mut reader).await;
    assert_eq!(got["topic"], "public.chat", "{got}");
    assert_eq!(got["data"], json!({"n":7}));
    expect_silence(&mut reader, Duration::from_millis(300)).await;
    // Anonymous lists are not empty: no 4003 after auth_timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(is_ack(&sub_result(&mut anon, "public.y", 8).await, 8));
    let m = server.metrics().await;
    assert!(metric(&m, r#"wsbroker_auth_rejected_total{reason="forbidden"}"#) >= 4.0);
}

#[tokio::test]
async fn no_permission_and_no_auth_within_auth_timeout_closes_4003() {
    let secret = secret_file();
    let server = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__AUTH_TIMEOUT", "1s"),
    ])
    .await;
    let before = metric(
        &server.metrics().await,
        r#"wsbroker_connections_closed_total{reason="auth"}"#,
    );
    let started = std::time::Instant::now();
    let (mut idle, _) = ws_with(&server, "/ws", &[]).await.expect("anonymous");
    let (mut authed, _) = ws_with(&server, "/ws", &[]).await.expect("anonymous");
    let hs = Signer::hmac("HS256", SECRET);
    send(
        &mut authed,
        json!({"op":"auth","token":hs.sign(&claims("u", 300, &["a"], &[])),"id":1}),
    )
    .await;
    assert!(is_ack(&recv(&mut authed).await, 1));
    // An invalid auth op does not count as authenticating.
    send(&mut idle, json!({"op":"auth","token":"a.b.c","id":1})).await;
    assert!(is_error(&recv(&mut idle).await, 1, "unauthorized"));
    let frame = expect_close(&mut idle).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4003);
    assert_eq!(frame.reason.as_str(), "authentication required");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // The authenticated one stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(is_ack(&sub_result(&mut authed, "a", 2).await, 2));
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let m = server.metrics().await;
        if metric(&m, r#"wsbroker_connections_closed_total{reason="auth"}"#) >= before + 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "close not counted as auth"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn expiry_closes_4001_unless_refreshed_on_the_live_connection() {
    let secret = secret_file();
    let server = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__LEEWAY", "0s"),
    ])
    .await;
    let hs = Signer::hmac("HS256", SECRET);
    let short = hs.sign(&claims("u1", 2, &["a"], &["a"]));
    let mut expiring = ws_bearer(&server, &short).await;
    let mut refreshed = ws_bearer(&server, &short).await;
    subscribe(&mut refreshed, "a", 1).await;
    // Refresh before exp: a new exp, the same permissions.
    let long = hs.sign(&claims("u1", 300, &["a"], &["a"]));
    send(&mut refreshed, json!({"op":"auth","token":long,"id":2})).await;
    let ack = recv(&mut refreshed).await;
    assert!(
        is_ack(&ack, 2) && ack["exp"].as_i64() > Some(now() + 200),
        "{ack}"
    );
    let frame = expect_close(&mut expiring).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4001);
    assert_eq!(frame.reason.as_str(), "token expired");
    // Past the old exp, the refreshed connection still works.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(is_ack(&pub_result(&mut refreshed, "a", 3).await, 3));
    let msg = recv(&mut refreshed).await;
    assert_eq!(msg["topic"], "a");
    // A refresh with an invalid token: unauthorized, the connection keeps
    // what it had.
    send(&mut refreshed, json!({"op":"auth","token":"x.y.z","id":4})).await;
    let err = recv(&mut refreshed).await;
    assert!(is_error(&err, 4, "unauthorized"), "{err}");
    assert!(is_ack(&sub_result(&mut refreshed, "a", 5).await, 5));
    // Expired tokens on the auth op are refused too.
    let old = hs.sign(&claims("u1", -10, &["a"], &["a"]));
    send(&mut refreshed, json!({"op":"auth","token":old,"id":6})).await;
    let err = recv(&mut refreshed).await;
    assert!(is_error(&err, 6, "unauthorized"), "{err}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired")),
        "{err}"
    );
}

#[tokio::test]
async fn a_narrowing_refresh_removes_what_it_no_longer_covers() {
    let secret = secret_file();
    let server = jwt_server(&[("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret)]).await;
    let hs = Signer::hmac("HS256", SECRET);
    let wide = hs.sign(&claims(
        "u1",
        300,
        &["chat.>", "news.>"],
        &["chat.x", "news.x"],
    ));
    let mut ws = ws_bearer(&server, &wide).await;
    subscribe(&mut ws, "chat.>", 1).await;
    subscribe(&mut ws, "news.a", 2).await;
    subscribe(&mut ws, "news.*", 3).await;
    let narrow = hs.sign(&claims("u1", 300, &["chat.>"], &["chat.x"]));
    send(&mut ws, json!({"op":"auth","token":narrow,"id":4})).await;
    let mut removed = Vec::new();
    loop {
        let f = recv(&mut ws).await;
        if f["type"] == "ack" {
            assert_eq!(f["id"], 4);
            assert!(f["exp"].is_u64(), "{f}");
            break;
        }
        assert_eq!(f["type"], "unsubscribed", "{f}");
        assert_eq!(f["reason"], "forbidden", "{f}");
        removed.push(f["topic"].as_str().unwrap_or("").to_string());
    }
    removed.sort();
    assert_eq!(removed, vec!["news.*", "news.a"]);
    // The old publish grant is gone; chat still flows.
    assert!(is_error(
        &pub_result(&mut ws, "news.x", 5).await,
        5,
        "forbidden"
    ));
    assert!(is_ack(&pub_result(&mut ws, "chat.x", 6).await, 6));
    assert_eq!(recv(&mut ws).await["topic"], "chat.x");
    // Nothing for the removed subscriptions reaches it.
    let publisher = hs.sign(&claims("p", 300, &[], &["news.>"]));
    let mut p = ws_bearer(&server, &publisher).await;
    assert!(is_ack(&pub_result(&mut p, "news.a", 1).await, 1));
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    // A refresh with another sub: forbidden, nothing changes.
    let other = hs.sign(&claims("u2", 300, &[">"], &[">"]));
    send(&mut ws, json!({"op":"auth","token":other,"id":7})).await;
    assert!(is_error(&recv(&mut ws).await, 7, "forbidden"));
    assert!(is_error(
        &sub_result(&mut ws, "news.a", 8).await,
        8,
        "forbidden"
    ));
    assert!(is_ack(&pub_result(&mut ws, "chat.x", 9).await, 9));
}

#[tokio::test]
async fn sub_is_expanded_in_claims_and_defaults() {
    let secret = secret_file();
    let server = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__DEFAULT_SUBSCRIBE", "user.{sub}.>"),
        ("WSBROKER__AUTH__DEFAULT_PUBLISH", "user.{sub}.out"),
    ])
    .await;
    let hs = Signer::hmac("HS256", SECRET);
    let mut ws = ws_bearer(&server, &hs.sign(&claims("u42", 300, &["room.{sub}"], &[]))).await;
    assert!(is_ack(&sub_result(&mut ws, "user.u42.inbox", 1).await, 1));
    assert!(is_ack(&sub_result(&mut ws, "user.u42.>", 2).await, 2));
    assert!(is_ack(&sub_result(&mut ws, "room.u42", 3).await, 3));
    assert!(is_error(
        &sub_result(&mut ws, "user.u43.inbox", 4).await,
        4,
        "forbidden"
    ));
    assert!(is_error(
        &sub_result(&mut ws, "user.*.inbox", 5).await,
        5,
        "forbidden"
    ));
    assert!(is_ack(&pub_result(&mut ws, "user.u42.out", 6).await, 6));
    assert_eq!(recv(&mut ws).await["topic"], "user.u42.out");
    assert!(is_error(
        &pub_result(&mut ws, "user.u43.out", 7).await,
        7,
        "forbidden"
    ));
    // A sub that is not a topic segment: such patterns grant nothing.
    let mut odd = ws_bearer(&server, &hs.sign(&claims("a.b", 300, &["x"], &[]))).await;
    assert!(is_error(
        &sub_result(&mut odd, "user.a.b.inbox", 1).await,
        1,
        "forbidden"
    ));
    assert!(is_error(
        &sub_result(&mut odd, "user.*.>", 2).await,
        2,
        "forbidden"
    ));
    assert!(is_ack(&sub_result(&mut odd, "x", 3).await, 3));
}

#[tokio::test]
async fn jwks_file_keys_are_picked_by_kid() {
    let k1 = Signer::es256().with_kid("k1");
    let k2 = Signer::ed25519().with_kid("k2");
    let k3 = Signer::rsa("PS256").with_kid("k3");
    let jwks = json!({"keys":[k1.jwk(), k2.jwk(), k3.jwk(),
        {"kty":"oct","kid":"sym","k":"c2VjcmV0"}]});
    let file = temp_file("jwks.json", &jwks.to_string());
    let server = jwt_server(&[("WSBROKER__AUTH__JWKS_FILE", &file)]).await;
    let c = claims("u", 300, &["a"], &[]);
    for s in [&k1, &k2, &k3] {
        let mut ws = ws_bearer(&server, &s.sign(&c)).await;
        assert!(is_ack(&sub_result(&mut ws, "a", 1).await, 1), "{:?}", s.kid);
    }
    // kid k1 but signed by k2's key (same header otherwise): refused.
    let wrong = k2.sign_with_header(&json!({"alg":"EdDSA","kid":"k1"}), &c);
    expect_401(&server, &bearer(&wrong), "does not fit").await;
    let wrong = Signer::es256().sign_with_header(&json!({"alg":"ES256","kid":"k1"}), &c);
    expect_401(&server, &bearer(&wrong), "bad signature").await;
    let unknown = Signer::es256().with_kid("nope").sign(&c);
    expect_401(&server, &bearer(&unknown), "unknown key").await;
}

#[tokio::test]
async fn jwks_url_rotation_through_a_local_https_endpoint() {
    let k1 = Signer::es256().with_kid("k1");
    let k2 = Signer::es256().with_kid("k2");
    let idp = common::auth::JwksServer::start(&json!({"keys":[k1.jwk()]}).to_string()).await;
    let ca = idp.ca_path.display().to_string();
    // A PEM key of the same type beside the URL: a token with a new kid is
    // tried against it (and fails) and must still make the broker refetch.
    let pem = temp_file("other.pem", &Signer::es256().public_pem);
    let server = jwt_server(&[
        ("WSBROKER__AUTH__JWKS_URL", &idp.url),
        ("WSBROKER__AUTH__JWKS_CA", &ca),
        ("WSBROKER__AUTH__PUBLIC_KEYS", &pem),
    ])
    .await;
    assert_eq!(idp.hits(), 1, "fetched once at start");
    let c = claims("u", 300, &["a"], &[]);
    let mut ws = ws_bearer(&server, &k1.sign(&c)).await;
    assert!(is_ack(&sub_result(&mut ws, "a", 1).await, 1));
    // The provider rotates: k2 replaces k1. Concurrent tokens with the new
    // kid share one fetch.
    idp.set(200, &json!({"keys":[k2.jwk()]}).to_string());
    let token = k2.sign(&c);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (s, t) = (&server, token.clone());
        tasks.push(async move { ws_bearer(s, &t).await });
    }
    for mut ws in futures_util::future::join_all(tasks).await {
        assert!(is_ack(&sub_result(&mut ws, "a", 1).await, 1));
    }
    assert_eq!(idp.hits(), 2, "five misses, one fetch");
    // Another unknown kid within 30 s: no fetch, unknown key; the rotated-out
    // key is gone.
    // (Tried against the PEM key, so: bad signature.)
    let k3 = Signer::es256().with_kid("k3");
    expect_401(&server, &bearer(&k3.sign(&c)), "bad signature").await;
    expect_401(&server, &bearer(&k1.sign(&c)), "bad signature").await;
    let k4 = Signer::ed25519().with_kid("k4");
    expect_401(&server, &bearer(&k4.sign(&c)), "unknown key").await;
    assert_eq!(idp.hits(), 2, "misses are rate-limited");
    // The connection made with k1 keeps its permissions.
    assert!(is_ack(&sub_result(&mut ws, "a", 2).await, 2));
}

#[tokio::test]
async fn a_failed_jwks_fetch_keeps_the_last_good_set() {
    let k1 = Signer::es256().with_kid("k1");
    let k2 = Signer::es384().with_kid("k2");
    let idp = common::auth::JwksServer::start(&json!({"keys":[k1.jwk()]}).to_string()).await;
    let ca = idp.ca_path.display().to_string();
    let server = jwt_server(&[
        ("WSBROKER__AUTH__JWKS_URL", &idp.url),
        ("WSBROKER__AUTH__JWKS_CA", &ca),
        ("WSBROKER__AUTH__JWKS_REFRESH", "300ms"),
    ])
    .await;
    let errors = r#"wsbroker_auth_jwks_fetch_errors_total"#;
    let before = metric(&server.metrics().await, errors);
    let c = claims("u", 300, &["a"], &[]);
    for (status, body) in [(500, "oops"), (200, "{\"keys\": 5}"), (200, "not json")] {
        idp.set(status, body);
        let seen = idp.hits();
        let deadline = tokio::time::Instant::now() + common::WAIT;
        while idp.hits() < seen + 2 {
            assert!(tokio::time::Instant::now() < deadline, "no refresh");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut ws = ws_bearer(&server, &k1.sign(&c)).await;
        assert!(
            is_ack(&sub_result(&mut ws, "a", 1).await, 1),
            "{status} {body}"
        );
    }
    assert!(metric(&server.metrics().await, errors) >= before + 3.0);
    // The scheduled refresh picks up a new set.
    idp.set(200, &json!({"keys":[k2.jwk()]}).to_string());
    let seen = idp.hits();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while idp.hits() < seen + 2 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ws = ws_bearer(&server, &k2.sign(&c)).await;
    assert!(is_ack(&sub_result(&mut ws, "a", 1).await, 1));
}

/// The config of the real binary in these tests: JSON logs at `level`,
/// jwt mode with the given `[auth]` lines.
fn daemon_config(cert: &common::TestCert, level: &str, auth: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[origins]\nallow = [\"{}\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"{level}\"\nformat = \"json\"\n[auth]\nmode = \"jwt\"\n{auth}\n",
        cert.cert_path.display(),
        cert.key_path.display(),
        common::ORIGIN
    )
}

/// The real binary at debug level (every crate: rustls, hyper, tungstenite
/// included): tokens presented every way, valid and not, then SIGHUP
/// reloads (a new key; a bad file that is refused). No line may contain a
/// token or its payload or signature part.
#[tokio::test]
async fn the_real_binary_never_logs_tokens_and_reloads_keys_on_sighup() {
    let cert = common::make_cert();
    let dir = cert.dir.path().to_path_buf();
    let k1 = Signer::es256();
    let k2 = Signer::ed25519();
    let k1_path = write(&dir, "k1.pem", &k1.public_pem);
    let k2_path = write(&dir, "k2.pem", &k2.public_pem);
    let bad_path = write(&dir, "bad.pem", "not a key\n");
    let config = dir.join("wsbroker.toml");
    let auth_lines = |key: &std::path::Path| {
        format!(
            "public_keys = [\"{}\"]\nallow_query_token = true\nanonymous_subscribe = [\"public.>\"]\n",
            key.display()
        )
    };
    std::fs::write(
        &config,
        daemon_config(&cert, "debug,wsbroker=trace", &auth_lines(&k1_path)),
    )
    .expect("config");
    let d = common::daemon::Daemon::start(common::daemon::serve_command(&config));
    let tls = common::client_config(&cert.cert_der);
    let mut tokens: Vec<String> = Vec::new();
    fn mint(tokens: &mut Vec<String>, s: &Signer, sub: &str) -> String {
        let t = s.sign(&claims(sub, 300, &["a.>"], &["a.x"]));
        tokens.push(t.clone());
        t
    }
    let header = mint(&mut tokens, &k1, "u1");
    let proto = mint(&mut tokens, &k1, "u2");
    let query = mint(&mut tokens, &k1, "u3");
    let op = mint(&mut tokens, &k1, "u4");
    let cli = mint(&mut tokens, &k1, "u5");
    let wrong_key = mint(&mut tokens, &Signer::es256(), "u6");
    let tampered = {
        let t = mint(&mut tokens, &k1, "u7");
        let fake = format!("{}AAAA", &t[..t.len() - 4]);
        tokens.push(fake.clone());
        fake
    };
    let auth = |t: &str| format!("Bearer {t}");
    let (mut by_header, _) = ws_at_ok(&d, &tls, "/ws", &[("Authorization", &auth(&header))]).await;
    subscribe(&mut by_header, "a.>", 1).await;
    let subproto = format!("wsbroker.v1, wsbroker.bearer.{proto}");
    let (mut by_proto, selected) =
        ws_at_ok(&d, &tls, "/ws", &[("Sec-WebSocket-Protocol", &subproto)]).await;
    assert_eq!(selected.as_deref(), Some("wsbroker.v1"));
    subscribe(&mut by_proto, "a.b", 1).await;
    let (mut by_query, _) = ws_at_ok(&d, &tls, &format!("/ws?token={query}"), &[]).await;
    subscribe(&mut by_query, "a.c", 1).await;
    let (mut by_op, _) = ws_at_ok(&d, &tls, "/ws", &[]).await;
    send(&mut by_op, json!({"op":"auth","token":op,"id":1})).await;
    assert!(is_ack(&recv(&mut by_op).await, 1));
    send(&mut by_op, json!({"op":"auth","token":tampered,"id":2})).await;
    assert!(is_error(&recv(&mut by_op).await, 2, "unauthorized"));
    for bad in [&wrong_key, &tampered] {
        for (path, headers) in [
            ("/ws".to_string(), vec![("Authorization", auth(bad))]),
            (
                "/ws".to_string(),
                vec![(
                    "Sec-WebSocket-Protocol",
                    format!("wsbroker.v1, wsbroker.bearer.{bad}"),
                )],
            ),
            (format!("/ws?token={bad}"), vec![]),
        ] {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let err = common::auth::ws_at(d.wss, &tls, &path, &h)
                .await
                .expect_err("a bad token is refused");
            assert!(err.to_string().contains("401"), "{err}");
        }
    }
    // The CLI's --token (Authorization: Bearer).
    let url = format!("wss://localhost:{}/ws", d.wss.port());
    let ca = cert.cert_path.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::daemon::BIN)
            .args([
                "pub",
                "--url",
                &url,
                "--topic",
                "a.x",
                "--data",
                "{\"cli\":1}",
            ])
            .args(["--origin", common::ORIGIN, "--ca", &ca, "--token", &cli])
            .output()
            .expect("run pub")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(recv(&mut by_header).await["data"], json!({"cli":1}));
    let cli_log = String::from_utf8_lossy(&out.stderr).into_owned();

    // SIGHUP: k2 replaces k1. Open connections keep their permissions.
    std::fs::write(
        &config,
        daemon_config(&cert, "debug,wsbroker=trace", &auth_lines(&k2_path)),
    )
    .expect("config");
    let seen = d.count_lines("reload applied");
    d.signal(libc::SIGHUP);
    d.wait_for_line("reload applied", seen).await;
    let new = mint(&mut tokens, &k2, "u8");
    let old = mint(&mut tokens, &k1, "u9");
    let (mut by_new, _) = ws_at_ok(&d, &tls, "/ws", &[("Authorization", &auth(&new))]).await;
    subscribe(&mut by_new, "a.y", 1).await;
    let err = common::auth::ws_at(d.wss, &tls, "/ws", &[("Authorization", &auth(&old))])
        .await
        .expect_err("the removed key is refused");
    assert!(err.to_string().contains("401"), "{err}");
    send(
        &mut by_proto,
        json!({"op":"publish","topic":"a.x","data":1,"id":2}),
    )
    .await;
    assert!(is_ack(&recv(&mut by_proto).await, 2));
    // A bad file: refused by key, the running keys stay.
    std::fs::write(
        &config,
        daemon_config(&cert, "debug,wsbroker=trace", &auth_lines(&bad_path)),
    )
    .expect("config");
    let seen = d.count_lines("auth.public_keys[0]");
    d.signal(libc::SIGHUP);
    d.wait_for_line("auth.public_keys[0]", seen).await;
    let (mut again, _) = ws_at_ok(&d, &tls, "/ws", &[("Authorization", &auth(&new))]).await;
    subscribe(&mut again, "a.z", 1).await;
    drop((by_header, by_proto, by_query, by_op, by_new, again));

    let text = d.log_text();
    assert!(text.contains("auth rejected"), "rejections are logged");
    assert!(
        text.lines()
            .any(|l| l.contains("auth rejected") && l.contains("\"peer\"") && l.contains("\"id\"")),
        "a rejection line names the connection id and peer"
    );
    assert!(text.lines().count() > 50, "debug logging is on");
    for t in &tokens {
        let parts: Vec<&str> = t.split('.').collect();
        for (what, needle) in [
            ("token", t.as_str()),
            ("payload", parts[1]),
            ("signature", parts[2]),
        ] {
            assert!(
                !text.contains(needle) && !cli_log.contains(needle),
                "a token's {what} is in the log"
            );
        }
    }
}

async fn ws_at_ok(
    d: &common::daemon::Daemon,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> (Ws, Option<String>) {
    common::auth::ws_at(d.wss, tls, path, headers)
        .await
        .expect("upgrade")
}

#[test]
fn check_config_names_each_bad_auth_key() {
    let cert = common::make_cert();
    let dir = cert.dir.path();
    let not_key = write(dir, "not-key.pem", "hello\n");
    let private = write(dir, "private.pem", &common::auth::rsa_pems().0);
    let bad_jwks = write(dir, "jwks.json", "{\"keys\": [{\"kty\": \"EC\"}]}");
    let short = write(dir, "short", "abc\n");
    let run = |auth: &str| {
        let file = dir.join("c.toml");
        std::fs::write(&file, daemon_config(&cert, "info", auth)).expect("write");
        let out = std::process::Command::new(common::daemon::BIN)
            .args(["check-config", "--config"])
            .arg(&file)
            .output()
            .expect("check-config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&format!(
        "hmac_secret_file = \"{}/missing\"\npublic_keys = [\"{}\", \"{}\"]\njwks_file = \"{}\"\n\
         jwks_url = \"http://idp.example/jwks\"\njwks_ca = \"{}/nope.pem\"\n\
         anonymous_subscribe = [\"ok.>\", \"bad..pattern\"]\ndefault_publish = [\"a.>.b\"]\n\
         leeway = \"soon\"\nbogus = 1\n",
        dir.display(),
        not_key.display(),
        private.display(),
        bad_jwks.display(),
        dir.display()
    ));
    assert_eq!(code, Some(1), "{text}");
    for key in [
        "auth.hmac_secret_file: file not found",
        "auth.public_keys[0]:",
        "auth.public_keys[1]:",
        "auth.jwks_file:",
        "auth.jwks_url:",
        "auth.jwks_ca:",
        "auth.anonymous_subscribe[1]: bad pattern",
        "auth.default_publish[0]: bad pattern",
        "auth.leeway:",
        "auth.bogus: unknown key",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(key)),
            "no `{key}` line in:\n{text}"
        );
    }
    assert!(text.contains("private key"), "{text}");
    let (code, text) = run("");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("auth.mode:") && l.contains("at least one key")),
        "{text}"
    );
    let (code, text) = run(&format!("hmac_secret_file = \"{}\"\n", short.display()));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("auth.hmac_secret_file:") && l.contains("32")),
        "{text}"
    );
    let file = dir.join("m.toml");
    std::fs::write(
        &file,
        daemon_config(&cert, "info", "").replace("mode = \"jwt\"", "mode = \"ldap\""),
    )
    .expect("write");
    let out = std::process::Command::new(common::daemon::BIN)
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .expect("check-config");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.lines()
            .any(|l| l.starts_with("auth.mode:") && l.contains("ldap")),
        "{text}"
    );
    // The shipped example config (mode none) stays valid, and a good jwt one passes.
    let ok = write(
        dir,
        "secret",
        &format!("{}\n", String::from_utf8_lossy(SECRET)),
    );
    let (code, text) = run(&format!("hmac_secret_file = \"{}\"\n", ok.display()));
    assert_eq!(code, Some(0), "{text}");
}

/// `auth.mode` needs a restart: a reload that changes it says so and keeps
/// the running mode, while the other `[auth]` keys apply at once.
#[tokio::test]
async fn a_reload_keeps_the_mode_and_applies_the_lists() {
    let secret = secret_file();
    let server = TestServer::start(&[]).await;
    let new = common::settings(
        &server.cert,
        &[
            ("WSBROKER__AUTH__MODE", "jwt"),
            ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ],
    );
    let restart = server.server.reload(new).expect("reload");
    assert_eq!(restart, vec!["auth.mode".to_string()]);
    // Still mode none: anything goes, tokens are ignored.
    let (mut ws, _) = ws_with(&server, "/ws", &[("Authorization", "Bearer junk")])
        .await
        .expect("mode none stays");
    subscribe(&mut ws, "any", 1).await;

    let jwt = jwt_server(&[
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
        ("WSBROKER__AUTH__ANONYMOUS_SUBSCRIBE", "public.>"),
    ])
    .await;
    let (mut anon, _) = ws_with(&jwt, "/ws", &[]).await.expect("anonymous");
    assert!(is_ack(&sub_result(&mut anon, "public.a", 1).await, 1));
    let new = common::settings(
        &jwt.cert,
        &[
            ("WSBROKER__AUTH__MODE", "jwt"),
            ("WSBROKER__AUTH__HMAC_SECRET_FILE", &secret),
            ("WSBROKER__AUTH__ANONYMOUS_SUBSCRIBE", "news.>"),
        ],
    );
    assert!(jwt.server.reload(new).expect("reload").is_empty());
    // New connections get the new list; the open one keeps its own.
    let (mut fresh, _) = ws_with(&jwt, "/ws", &[]).await.expect("anonymous");
    assert!(is_ack(&sub_result(&mut fresh, "news.a", 1).await, 1));
    assert!(is_error(
        &sub_result(&mut fresh, "public.a", 2).await,
        2,
        "forbidden"
    ));
    assert!(is_ack(&sub_result(&mut anon, "public.b", 2).await, 2));
}
