//! Verification keys and JWS signature checks, with ring (the crypto stack
//! rustls already uses). A key fixes the algorithms it verifies: an HMAC
//! secret only HS*, RSA only RS*/PS*, an EC key only ES* of its curve,
//! Ed25519 only EdDSA (no algorithm confusion, no `none`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use rustls::pki_types::pem::{PemObject, SectionKind};

/// A JWS algorithm this broker verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// HMAC SHA-256.
    HS256,
    /// HMAC SHA-384.
    HS384,
    /// HMAC SHA-512.
    HS512,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 SHA-512.
    RS512,
    /// RSASSA-PSS SHA-256.
    PS256,
    /// RSASSA-PSS SHA-384.
    PS384,
    /// RSASSA-PSS SHA-512.
    PS512,
    /// ECDSA P-256 SHA-256.
    ES256,
    /// ECDSA P-384 SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

impl Alg {
    /// The JOSE name (`"alg"` header); `None` for `none` and anything unsupported.
    pub fn from_name(name: &str) -> Option<Alg> {
        Some(match name {
            "HS256" => Alg::HS256,
            "HS384" => Alg::HS384,
            "HS512" => Alg::HS512,
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }
}

/// Public (or shared) key material.
#[derive(Clone)]
pub enum KeyMaterial {
    /// HMAC secret.
    Hmac(Vec<u8>),
    /// RSA modulus and exponent (big-endian, no leading zeros).
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// P-256 uncompressed point.
    P256(Vec<u8>),
    /// P-384 uncompressed point.
    P384(Vec<u8>),
    /// Ed25519 public key.
    Ed25519(Vec<u8>),
}

impl std::fmt::Debug for KeyMaterial {
    // Never print key bytes (the HMAC secret is one).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl KeyMaterial {
    /// Short name of the key type, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyMaterial::Hmac(_) => "HMAC secret",
            KeyMaterial::Rsa { .. } => "RSA key",
            KeyMaterial::P256(_) => "EC P-256 key",
            KeyMaterial::P384(_) => "EC P-384 key",
            KeyMaterial::Ed25519(_) => "Ed25519 key",
        }
    }

    /// Whether this key may verify `alg` (the key fixes the algorithm).
    pub fn supports(&self, alg: Alg) -> bool {
        use Alg::*;
        matches!(
            (self, alg),
            (KeyMaterial::Hmac(_), HS256 | HS384 | HS512)
                | (
                    KeyMaterial::Rsa { .. },
                    RS256 | RS384 | RS512 | PS256 | PS384 | PS512
                )
                | (KeyMaterial::P256(_), ES256)
                | (KeyMaterial::P384(_), ES384)
                | (KeyMaterial::Ed25519(_), EdDSA)
        )
    }

    /// Checks `sig` over `msg`; false for a key that does not support `alg`.
    pub fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        if !self.supports(alg) {
            return false;
        }
        match self {
            KeyMaterial::Hmac(secret) => {
                let algo = match alg {
                    Alg::HS256 => ring::hmac::HMAC_SHA256,
                    Alg::HS384 => ring::hmac::HMAC_SHA384,
                    _ => ring::hmac::HMAC_SHA512,
                };
                // Constant-time comparison inside ring.
                ring::hmac::verify(&ring::hmac::Key::new(algo, secret), msg, sig).is_ok()
            }
            KeyMaterial::Rsa { n, e } => {
                let params: &signature::RsaParameters = match alg {
                    Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                    _ => &signature::RSA_PSS_2048_8192_SHA512,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            KeyMaterial::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            KeyMaterial::P384(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            KeyMaterial::Ed25519(k) => UnparsedPublicKey::new(&signature::ED25519, k)
                .verify(msg, sig)
                .is_ok(),
        }
    }
}

/// One configured key: material, the JWKS `kid` (none for PEM keys and the
/// HMAC secret) and an algorithm pinned by the JWK's `alg`, if any.
#[derive(Debug, Clone)]
pub struct Key {
    /// `kid` from a JWKS.
    pub kid: Option<String>,
    /// `alg` from a JWK: only this algorithm.
    pub alg: Option<Alg>,
    /// The key.
    pub material: KeyMaterial,
}

impl Key {
    /// Whether this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Alg) -> bool {
        self.material.supports(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

// --- DER -----------------------------------------------------------------

use crate::der::{tlv, SEQUENCE};

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// A big-endian unsigned integer without leading zeros.
fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while b.len() > 1 && b[0] == 0 {
        b = &b[1..];
    }
    b
}

/// SubjectPublicKeyInfo (DER) to key material.
pub fn from_spki(der: &[u8]) -> Result<KeyMaterial, String> {
    let bad = || "malformed SubjectPublicKeyInfo".to_string();
    let (tag, spki, _) = tlv(der).ok_or_else(bad)?;
    if tag != SEQUENCE {
        return Err(bad());
    }
    let (tag, alg_id, rest) = tlv(spki).ok_or_else(bad)?;
    if tag != SEQUENCE {
        return Err(bad());
    }
    let (tag, oid, params) = tlv(alg_id).ok_or_else(bad)?;
    if tag != 0x06 {
        return Err(bad());
    }
    let (tag, bits, _) = tlv(rest).ok_or_else(bad)?;
    if tag != 0x03 || bits.first() != Some(&0) {
        return Err(bad());
    }
    let key = &bits[1..];
    if oid == OID_RSA {
        let (tag, seq, _) = tlv(key).ok_or_else(bad)?;
        if tag != SEQUENCE {
            return Err(bad());
        }
        let (tag, n, rest) = tlv(seq).ok_or_else(bad)?;
        let (tag2, e, _) = tlv(rest).ok_or_else(bad)?;
        if tag != 0x02 || tag2 != 0x02 {
            return Err(bad());
        }
        let n = strip_zeros(n);
        if n.len() * 8 < 2048 {
            return Err("RSA keys must have at least 2048 bits".into());
        }
        return Ok(KeyMaterial::Rsa {
            n: n.to_vec(),
            e: strip_zeros(e).to_vec(),
        });
    }
    if oid == OID_EC {
        let (tag, curve, _) = tlv(params).ok_or_else(bad)?;
        if tag != 0x06 {
            return Err(bad());
        }
        return match curve {
            c if c == OID_P256 && key.len() == 65 => Ok(KeyMaterial::P256(key.to_vec())),
            c if c == OID_P384 && key.len() == 97 => Ok(KeyMaterial::P384(key.to_vec())),
            _ => Err("unsupported EC curve (P-256 and P-384 are supported, uncompressed)".into()),
        };
    }
    if oid == OID_ED25519 && key.len() == 32 {
        return Ok(KeyMaterial::Ed25519(key.to_vec()));
    }
    Err("unsupported key type (RSA, EC P-256/P-384 and Ed25519 are supported)".into())
}

/// The SubjectPublicKeyInfo of an X.509 certificate (DER).
fn cert_spki(der: &[u8]) -> Option<&[u8]> {
    let [.., spki] = crate::der::tbs_fields(der)?;
    (spki.tag == SEQUENCE).then_some(spki.whole)
}

/// Every key in a PEM file (`PUBLIC KEY` and `CERTIFICATE` sections).
pub fn from_pem(bytes: &[u8]) -> Result<Vec<KeyMaterial>, String> {
    let mut out = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| format!("not valid PEM: {e}"))?;
        match kind {
            SectionKind::PublicKey => out.push(from_spki(&der)?),
            SectionKind::Certificate => {
                let spki = cert_spki(&der).ok_or("malformed certificate")?;
                out.push(from_spki(spki)?);
            }
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                return Err(
                    "is a private key; configure the public key (SPKI PEM) or a certificate".into(),
                )
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Err("no PUBLIC KEY or CERTIFICATE section (not a PEM public key)".into());
    }
    Ok(out)
}

// --- JWK -----------------------------------------------------------------

fn b64(field: &str, v: Option<&serde_json::Value>) -> Result<Vec<u8>, String> {
    let s = v
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("missing `{field}`"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("`{field}` is not base64url"))
}

/// One JWK; `Ok(None)` for a key that is not for signatures or of a type
/// this broker does not verify (identity providers publish several kinds).
pub fn from_jwk(jwk: &serde_json::Value) -> Result<Option<Key>, String> {
    let obj = jwk.as_object().ok_or("a key is not a JSON object")?;
    if obj
        .get("use")
        .and_then(|u| u.as_str())
        .is_some_and(|u| u != "sig")
    {
        return Ok(None);
    }
    let kid = match obj.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err("`kid` is not a string".into()),
    };
    let alg = match obj.get("alg").and_then(|a| a.as_str()) {
        None => None,
        Some(name) => match Alg::from_name(name) {
            Some(a) => Some(a),
            None => return Ok(None),
        },
    };
    let kty = obj
        .get("kty")
        .and_then(|k| k.as_str())
        .ok_or("missing `kty`")?;
    let crv = obj.get("crv").and_then(|c| c.as_str());
    let material = match (kty, crv) {
        ("RSA", _) => {
            let n = b64("n", obj.get("n"))?;
            let e = b64("e", obj.get("e"))?;
            let n = strip_zeros(&n).to_vec();
            if n.len() * 8 < 2048 {
                return Err("RSA keys must have at least 2048 bits".into());
            }
            KeyMaterial::Rsa {
                n,
                e: strip_zeros(&e).to_vec(),
            }
        }
        ("EC", Some(curve @ ("P-256" | "P-384"))) => {
            let x = b64("x", obj.get("x"))?;
            let y = b64("y", obj.get("y"))?;
            let size = if curve == "P-256" { 32 } else { 48 };
            if x.len() != size || y.len() != size {
                return Err(format!("`x`/`y` of a {curve} key must be {size} bytes"));
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if size == 32 {
                KeyMaterial::P256(point)
            } else {
                KeyMaterial::P384(point)
            }
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64("x", obj.get("x"))?;
            if x.len() != 32 {
                return Err("`x` of an Ed25519 key must be 32 bytes".into());
            }
            KeyMaterial::Ed25519(x)
        }
        _ => return Ok(None),
    };
    let key = Key { kid, alg, material };
    if key.alg.is_some_and(|a| !key.material.supports(a)) {
        return Err(format!(
            "`alg` {:?} does not fit a {}",
            key.alg,
            key.material.kind()
        ));
    }
    Ok(Some(key))
}

/// A JWKS document (`{"keys":[…]}`) to its usable keys; an error when it
/// does not parse or holds no key this broker can verify with.
pub fn from_jwks(bytes: &[u8]) -> Result<Vec<Key>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("not a JWKS: no \"keys\" array")?;
    let mut out = Vec::new();
    for (i, jwk) in keys.iter().enumerate() {
        if let Some(k) = from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))? {
            out.push(k);
        }
    }
    if out.is_empty() {
        return Err("no usable signing key (RSA, EC P-256/P-384, Ed25519)".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key fixes the algorithm: every (key type, alg) pair outside the
    /// contract's table is refused before any signature check.
    #[test]
    fn each_key_type_supports_only_its_algorithms() {
        use Alg::*;
        let all = [
            HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
        ];
        let cases: [(KeyMaterial, &[Alg]); 5] = [
            (KeyMaterial::Hmac(vec![0; 32]), &[HS256, HS384, HS512]),
            (
                KeyMaterial::Rsa {
                    n: vec![1; 256],
                    e: vec![1, 0, 1],
                },
                &[RS256, RS384, RS512, PS256, PS384, PS512],
            ),
            (KeyMaterial::P256(vec![4; 65]), &[ES256]),
            (KeyMaterial::P384(vec![4; 97]), &[ES384]),
            (KeyMaterial::Ed25519(vec![0; 32]), &[EdDSA]),
        ];
        for (key, ok) in &cases {
            for alg in all {
                assert_eq!(key.supports(alg), ok.contains(&alg), "{key:?} {alg:?}");
            }
        }
        assert_eq!(Alg::from_name("none"), None);
        assert_eq!(Alg::from_name("ES512"), None);
        assert_eq!(Alg::from_name("hs256"), None);
    }

    #[test]
    fn a_real_p256_key_refuses_es384_and_a_forged_hmac() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let keys = from_pem(kp.public_key_pem().as_bytes()).expect("spki");
        let [key @ KeyMaterial::P256(_)] = keys.as_slice() else {
            panic!("expected one P-256 key, got {keys:?}");
        };
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &kp.serialize_der(),
            &rng,
        )
        .expect("signer");
        let sig = signer.sign(&rng, b"msg").expect("sign");
        assert!(key.verify(Alg::ES256, b"msg", sig.as_ref()));
        assert!(!key.verify(Alg::ES384, b"msg", sig.as_ref()));
        assert!(!key.verify(Alg::ES256, b"other", sig.as_ref()));
        // An HMAC over the PEM text, presented as HS256: not for this key.
        let pem = kp.public_key_pem();
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, pem.as_bytes()),
            b"msg",
        );
        assert!(!key.verify(Alg::HS256, b"msg", mac.as_ref()));
    }

    #[test]
    fn bad_key_files_say_why() {
        assert!(from_pem(b"hello").is_err());
        let private = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .expect("key")
            .serialize_pem();
        let err = from_pem(private.as_bytes()).expect_err("a private key");
        assert!(err.contains("private key"), "{err}");
        assert!(from_jwks(b"{}").is_err());
        assert!(from_jwks(b"not json").is_err());
        assert!(from_jwks(br#"{"keys":[{"kty":"oct","k":"AA"}]}"#)
            .expect_err("nothing usable")
            .contains("no usable"));
        assert!(from_jwks(br#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#).is_err());
    }
}
