//! Compact JWS parsing and claim checks (RFC 7515/7519). The signature is
//! checked before any claim is read; claims are typed strictly (a wrongly
//! typed `exp` is an invalid token, never a skipped check).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use super::keys::Alg;
use super::AuthError;

/// Largest token accepted (a header or a frame could carry anything).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// A token split into its parts, header parsed, signature not yet checked.
pub struct Parsed<'a> {
    /// Algorithm from the header.
    pub alg: Alg,
    /// `kid` from the header.
    pub kid: Option<String>,
    /// `header.payload`, the signed bytes.
    pub signed: &'a [u8],
    /// Decoded signature.
    pub signature: Vec<u8>,
    /// base64url of the claims.
    payload: &'a str,
}

fn decode(part: &str, what: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed(format!("{what} is not base64url")))
}

/// Splits and decodes a compact JWS; checks the header.
pub fn parse(token: &str) -> Result<Parsed<'_>, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed(format!(
            "token longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "not a compact JWS (header.payload.signature)".into(),
        ));
    };
    let header: Map<String, Value> = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|_| AuthError::Malformed("header is not a JSON object".into()))?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => Alg::from_name(name).ok_or_else(|| {
            // The name is the client's: escaped and cut, it goes to a log line.
            let shown: String = name.escape_debug().take(24).collect();
            AuthError::Malformed(format!("algorithm `{shown}` is not accepted"))
        })?,
        _ => return Err(AuthError::Malformed("header has no `alg`".into())),
    };
    if header.contains_key("crit") {
        // RFC 7515 §4.1.11: extensions we do not understand must fail.
        return Err(AuthError::Malformed(
            "`crit` header is not supported".into(),
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(AuthError::Malformed("`kid` is not a string".into())),
    };
    let signature = decode(s, "signature")?;
    Ok(Parsed {
        alg,
        kid,
        signed: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
        payload: p,
    })
}

/// What the claims say, checked.
#[derive(Debug, Clone)]
pub struct Claims {
    /// `sub`.
    pub sub: String,
    /// `exp`, Unix seconds.
    pub exp: u64,
    /// `wsbroker.subscribe`.
    pub subscribe: Vec<String>,
    /// `wsbroker.publish`.
    pub publish: Vec<String>,
}

/// The checks on the registered claims.
pub struct Rules<'a> {
    /// Required `iss`.
    pub issuer: Option<&'a str>,
    /// Required `aud` member.
    pub audience: Option<&'a str>,
    /// Clock skew, seconds.
    pub leeway: u64,
    /// Now, Unix seconds.
    pub now: u64,
}

fn numeric(v: &Value, name: &str) -> Result<f64, AuthError> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .ok_or_else(|| AuthError::Claims(format!("`{name}` is not a number")))
}

fn pattern_list(v: Option<&Value>, name: &str) -> Result<Vec<String>, AuthError> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let bad = || AuthError::Claims(format!("`wsbroker.{name}` is not a list of topic patterns"));
    let items = v.as_array().ok_or_else(bad)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let s = item.as_str().ok_or_else(bad)?;
        super::grants::validate_template(s).map_err(|_| bad())?;
        out.push(s.to_string());
    }
    Ok(out)
}

/// Decodes and checks the claims of a token whose signature verified.
pub fn claims(parsed: &Parsed<'_>, rules: &Rules<'_>) -> Result<Claims, AuthError> {
    let claims: Map<String, Value> = serde_json::from_slice(&decode(parsed.payload, "payload")?)
        .map_err(|_| AuthError::Claims("claims are not a JSON object".into()))?;
    let now = rules.now as f64;
    let leeway = rules.leeway as f64;
    let exp = numeric(
        claims
            .get("exp")
            .ok_or_else(|| AuthError::Claims("`exp` is missing".into()))?,
        "exp",
    )?;
    if now >= exp + leeway {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        if numeric(nbf, "nbf")? > now + leeway {
            return Err(AuthError::NotYetValid);
        }
    }
    let sub = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(AuthError::Claims("`sub` is not a non-empty string".into())),
        None => return Err(AuthError::Claims("`sub` is missing".into())),
    };
    if let Some(want) = rules.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(want) {
            return Err(AuthError::Issuer);
        }
    }
    if let Some(want) = rules.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => a == want,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(want)),
            _ => false,
        };
        if !ok {
            return Err(AuthError::Audience);
        }
    }
    let (subscribe, publish) = match claims.get("wsbroker") {
        None => (Vec::new(), Vec::new()),
        Some(Value::Object(w)) => (
            pattern_list(w.get("subscribe"), "subscribe")?,
            pattern_list(w.get("publish"), "publish")?,
        ),
        Some(_) => return Err(AuthError::Claims("`wsbroker` is not an object".into())),
    };
    Ok(Claims {
        sub,
        // exp was checked to be in the future (minus leeway): not negative
        // unless the leeway covers it; clamp for the ack.
        exp: exp.max(0.0).floor() as u64,
        subscribe,
        publish,
    })
}
