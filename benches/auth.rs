//! What authentication costs (issue 13): verifying one token per key type
//! (done once per connection, in the handshake task) and the per-request
//! grant checks (subscribe coverage, publish match). `cargo bench --bench auth`.

use std::hint::black_box;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use rustls::pki_types::pem::PemObject;
use wsbroker::auth::{Authenticator, Grants};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-bench";

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn signed(alg: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let claims = serde_json::json!({"sub":"u42","exp":exp,
        "wsbroker":{"subscribe":["chat.>","user.{sub}.>"],"publish":["chat.room1"]}});
    let msg = format!(
        "{}.{}",
        b64(serde_json::json!({"alg":alg,"typ":"JWT"})
            .to_string()
            .as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = sign(msg.as_bytes());
    format!("{msg}.{}", b64(&sig))
}

fn verification(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rng = SystemRandom::new();
    let mut tokens = Vec::new();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("write");
    tokens.push((
        "HS256",
        signed("HS256", |m| {
            ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET), m)
                .as_ref()
                .to_vec()
        }),
    ));
    let mut keys = Vec::new();
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
    let es = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &p256.serialize_der(),
        &rng,
    )
    .expect("p256");
    keys.push(("p256.pem", p256.public_key_pem()));
    tokens.push((
        "ES256",
        signed("ES256", |m| {
            es.sign(&rng, m).expect("sign").as_ref().to_vec()
        }),
    ));
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed");
    let edk = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&ed.serialize_der()).expect("ed");
    keys.push(("ed.pem", ed.public_key_pem()));
    tokens.push(("EdDSA", signed("EdDSA", |m| edk.sign(m).as_ref().to_vec())));
    // RSA needs openssl (ring cannot generate RSA keys); skipped without it.
    let rsa_key = dir.path().join("rsa.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa_key)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&rsa_key)
            .output()
            .expect("openssl pkey");
        keys.push(("rsa.pem", String::from_utf8_lossy(&out.stdout).into_owned()));
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(&rsa_key).expect("pem");
        let kp = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("rsa");
        tokens.push((
            "RS256",
            signed("RS256", |m| {
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
                    .expect("sign");
                sig
            }),
        ));
    }
    let mut public_keys = Vec::new();
    for (name, pem) in &keys {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).expect("write");
        public_keys.push(p);
    }
    let mut settings = wsbroker::config::Settings::dev_defaults().auth;
    settings.mode = wsbroker::config::AuthMode::Jwt;
    settings.hmac_secret_file = Some(secret);
    settings.public_keys = public_keys;
    let auth = Authenticator::load(&settings, None).expect("keys load");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("verify");
    for (alg, token) in &tokens {
        assert!(rt.block_on(auth.verify(token)).is_ok(), "{alg} verifies");
        group.bench_function(*alg, |b| {
            b.iter(|| black_box(rt.block_on(auth.verify(black_box(token))).is_ok()))
        });
    }
    group.finish();
}

fn grants(c: &mut Criterion) {
    let g = Grants::new(
        &["chat.>", "user.{sub}.>", "news.*.headlines", "public.>"],
        &["chat.room1", "chat.room2", "user.{sub}.out", "metrics.*"],
        Some("u42"),
    );
    let mut group = c.benchmark_group("grants");
    group.bench_function("publish_allowed", |b| {
        b.iter(|| black_box(g.may_publish(black_box("metrics.cpu"))))
    });
    group.bench_function("publish_denied", |b| {
        b.iter(|| black_box(g.may_publish(black_box("admin.shutdown"))))
    });
    group.bench_function("subscribe_covered", |b| {
        b.iter(|| black_box(g.may_subscribe(black_box("user.u42.inbox.*"))))
    });
    group.finish();
}

criterion_group!(benches, verification, grants);
criterion_main!(benches);
