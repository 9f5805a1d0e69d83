//! Authentication and per-topic authorization with JWTs (CONTRACT §10).
//!
//! - `keys`: key material (HMAC, RSA, EC, Ed25519 from PEM/X.509/JWK) and
//!   signature checks with ring; the key fixes the algorithm.
//! - `jwt`: compact JWS parsing and claim checks.
//! - `jwks`: `auth.jwks_url`, fetched over https and refreshed.
//! - `grants`: a connection's compiled permissions (coverage / match).
//!
//! [`Authenticator`] holds the keys and lists of one configuration (replaced
//! whole on SIGHUP); a [`Session`] is one connection's identity, grants and
//! deadline (4001 at expiry, 4003 without any permission), owned by that
//! connection so the publish path takes no shared lock.

pub mod grants;
pub mod jwks;
pub mod jwt;
pub mod keys;

use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::config::{AuthMode, AuthSettings};
use crate::logging::RateLimit;
use crate::metrics::AuthReason;
pub use grants::Grants;
use jwks::RemoteJwks;
use keys::{Key, KeyMaterial};

/// Shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_HMAC_SECRET: usize = 32;

/// Close code and reason when a token expires unrefreshed.
pub const EXPIRED_CLOSE: (u16, &str) = (4001, "token expired");
/// Close code and reason when a connection without permissions does not
/// authenticate within `auth_timeout`.
pub const REQUIRED_CLOSE: (u16, &str) = (4003, "authentication required");

/// Why a token was refused. The text is what a client is told (401 body,
/// error frame); it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a well-formed JWS, or an algorithm we never accept (`none`).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// No configured key for the token's `kid` or algorithm.
    #[error("unknown key")]
    UnknownKey,
    /// The `kid` names a key of another type than the algorithm.
    #[error("algorithm {alg} does not fit the key (a {kind})")]
    AlgorithmMismatch {
        /// The token's `alg`.
        alg: String,
        /// The key's type.
        kind: &'static str,
    },
    /// No candidate key verifies the signature.
    #[error("bad signature")]
    BadSignature,
    /// `exp` + leeway has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` - leeway is in the future.
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// `iss` is not `auth.issuer`.
    #[error("wrong issuer")]
    Issuer,
    /// `aud` does not contain `auth.audience`.
    #[error("wrong audience")]
    Audience,
    /// A claim is missing or of the wrong type.
    #[error("invalid claims: {0}")]
    Claims(String),
    /// `?token=` while `auth.allow_query_token = false`.
    #[error("a token in the URL query (?token=) is not accepted here (auth.allow_query_token = false); send it in the Authorization header or the Sec-WebSocket-Protocol list")]
    QueryNotAllowed,
    /// Several tokens on one upgrade request.
    #[error("more than one token presented; send exactly one")]
    Several,
}

impl AuthError {
    /// The `wsbroker_auth_rejected_total` reason.
    pub fn reason(&self) -> AuthReason {
        match self {
            AuthError::Expired => AuthReason::Expired,
            AuthError::UnknownKey => AuthReason::UnknownKey,
            _ => AuthReason::Invalid,
        }
    }
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`.
    pub sub: String,
    /// `exp`, Unix seconds.
    pub exp: u64,
    /// Claims plus `default_*`, `{sub}` expanded.
    pub grants: Grants,
}

/// Now as Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Longest deadline kept: a token's `exp` is the signer's choice, and an
/// `Instant` far in the future would overflow.
pub const MAX_DEADLINE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `now + d`, with `d` capped at [`MAX_DEADLINE`].
fn deadline_in(d: Duration) -> Instant {
    Instant::now() + d.min(MAX_DEADLINE)
}

/// One configuration's keys and lists.
pub struct Authenticator {
    settings: AuthSettings,
    keys: Vec<Key>,
    remote: Option<Arc<RemoteJwks>>,
    anonymous: Grants,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.settings.mode)
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("file not found: {}", path.display()),
        _ => format!("cannot read {}: {e}", path.display()),
    })
}

/// Reads every key file; each problem is one line naming its key.
fn load_keys(s: &AuthSettings, errors: &mut Vec<String>) -> Vec<Key> {
    let mut keys = Vec::new();
    if let Some(path) = &s.hmac_secret_file {
        match read_file(path) {
            Ok(mut secret) => {
                // One trailing newline (an `echo` into the file) is not part of it.
                if secret.last() == Some(&b'\n') {
                    secret.pop();
                    if secret.last() == Some(&b'\r') {
                        secret.pop();
                    }
                }
                if secret.len() < MIN_HMAC_SECRET {
                    errors.push(format!(
                        "auth.hmac_secret_file: {}: the secret is {} bytes; at least {MIN_HMAC_SECRET} are required",
                        path.display(),
                        secret.len()
                    ));
                } else {
                    keys.push(Key {
                        kid: None,
                        alg: None,
                        material: KeyMaterial::Hmac(secret),
                    });
                }
            }
            Err(e) => errors.push(format!("auth.hmac_secret_file: {e}")),
        }
    }
    for (i, path) in s.public_keys.iter().enumerate() {
        match read_file(path)
            .and_then(|b| keys::from_pem(&b).map_err(|e| format!("{}: {e}", path.display())))
        {
            Ok(found) => keys.extend(found.into_iter().map(|material| Key {
                kid: None,
                alg: None,
                material,
            })),
            Err(e) => errors.push(format!("auth.public_keys[{i}]: {e}")),
        }
    }
    if let Some(path) = &s.jwks_file {
        match read_file(path).and_then(|b| {
            keys::from_jwks(&b).map_err(|e| format!("{}: invalid JWKS: {e}", path.display()))
        }) {
            Ok(found) => keys.extend(found),
            Err(e) => errors.push(format!("auth.jwks_file: {e}")),
        }
    }
    keys
}

/// check-config (and every load): the `[auth]` files, one line per problem.
pub fn validate(s: &AuthSettings, errors: &mut Vec<String>) {
    load_keys(s, errors);
    if let Some(ca) = &s.jwks_ca {
        if let Err(e) = jwks::roots(Some(ca)) {
            errors.push(format!("auth.jwks_ca: {e}"));
        }
    }
}

static REJECT_LOG: LazyLock<RateLimit> = LazyLock::new(|| RateLimit::new(Duration::from_secs(1)));

/// Logs a rejection (rate-limited, never the token): connection id, peer, reason.
pub fn log_rejection(id: u64, peer: std::net::SocketAddr, what: &str, detail: &str) {
    if let Some(suppressed) = REJECT_LOG.allow() {
        tracing::info!(id, %peer, reason = what, detail, suppressed, "auth rejected");
    }
}

impl Authenticator {
    /// Loads keys and lists. A `jwks_url` is reused from `previous` when
    /// unchanged (its fetched keys stay); otherwise a new one is made, not
    /// yet fetched (see [`Authenticator::remote`]).
    pub fn load(s: &AuthSettings, previous: Option<&Authenticator>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let keys = load_keys(s, &mut errors);
        let remote = match &s.jwks_url {
            None => None,
            Some(url) => {
                let same = previous.and_then(|p| {
                    p.remote
                        .as_ref()
                        .filter(|_| {
                            p.settings.jwks_url == s.jwks_url && p.settings.jwks_ca == s.jwks_ca
                        })
                        .cloned()
                });
                match same {
                    Some(r) => Some(r),
                    None => match jwks::roots(s.jwks_ca.as_deref())
                        .map_err(|e| format!("auth.jwks_ca: {e}"))
                        .and_then(|roots| {
                            RemoteJwks::new(url, roots).map_err(|e| format!("auth.jwks_url: {e}"))
                        }) {
                        Ok(r) => Some(Arc::new(r)),
                        Err(e) => {
                            errors.push(e);
                            None
                        }
                    },
                }
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Authenticator {
            anonymous: Grants::new(&s.anonymous_subscribe, &s.anonymous_publish, None),
            settings: s.clone(),
            keys,
            remote,
        })
    }

    /// `auth.mode`.
    pub fn mode(&self) -> AuthMode {
        self.settings.mode
    }

    /// The settings this was loaded from.
    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// The remote key set, if `jwks_url` is configured.
    pub fn remote(&self) -> Option<&Arc<RemoteJwks>> {
        self.remote.as_ref()
    }

    /// The session of a connection that presented no token.
    pub fn anonymous_session(&self) -> Session {
        let grants = self.anonymous.clone();
        let due = grants.is_empty().then(|| Due {
            at: deadline_in(self.settings.auth_timeout),
            close: REQUIRED_CLOSE,
        });
        Session {
            sub: None,
            grants,
            due,
            rearm: false,
        }
    }

    /// The session of a verified token: expires at `exp` + leeway.
    pub fn session(&self, id: Identity) -> Session {
        Session {
            due: Some(self.expiry(id.exp)),
            sub: Some(id.sub),
            grants: id.grants,
            rearm: false,
        }
    }

    fn expiry(&self, exp: u64) -> Due {
        let left = Duration::from_secs(exp.saturating_sub(unix_now()))
            .saturating_add(self.settings.leeway);
        Due {
            at: deadline_in(left),
            close: EXPIRED_CLOSE,
        }
    }

    /// Verifies a compact JWS: signature, then claims.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let parsed = jwt::parse(token)?;
        let first = self.check_signature(&parsed);
        match (&self.remote, &parsed.kid) {
            // A kid nobody has: the provider may have rotated. Fetch (rate
            // limited) and try again, also when a kid-less key of the same
            // type was tried and failed.
            (Some(remote), Some(kid)) if first.is_err() && !self.knows_kid(kid) => {
                remote.refresh_on_miss().await;
                self.check_signature(&parsed)?;
            }
            _ => first?,
        }
        let claims = jwt::claims(
            &parsed,
            &jwt::Rules {
                issuer: self.settings.issuer.as_deref(),
                audience: self.settings.audience.as_deref(),
                leeway: self.settings.leeway.as_secs(),
                now: unix_now(),
            },
        )?;
        let sub = Some(claims.sub.as_str());
        let subscribe: Vec<&str> = claims
            .subscribe
            .iter()
            .map(String::as_str)
            .chain(self.settings.default_subscribe.iter().map(String::as_str))
            .collect();
        let publish: Vec<&str> = claims
            .publish
            .iter()
            .map(String::as_str)
            .chain(self.settings.default_publish.iter().map(String::as_str))
            .collect();
        let grants = Grants::new(&subscribe, &publish, sub);
        Ok(Identity {
            sub: claims.sub,
            exp: claims.exp,
            grants,
        })
    }

    /// Whether a configured or fetched key has this `kid`.
    fn knows_kid(&self, kid: &str) -> bool {
        let known = |k: &Key| k.kid.as_deref() == Some(kid);
        self.keys.iter().any(known)
            || self
                .remote
                .as_ref()
                .is_some_and(|r| r.keys().iter().any(known))
    }

    /// Picks the candidate keys (by `kid`, else every key without one of
    /// the algorithm's type) and checks the signature.
    fn check_signature(&self, t: &jwt::Parsed<'_>) -> Result<(), AuthError> {
        let remote = self.remote.as_ref().map(|r| r.keys());
        let all = || self.keys.iter().chain(remote.iter().flat_map(|r| r.iter()));
        let named: Vec<&Key> = match &t.kid {
            Some(kid) => all().filter(|k| k.kid.as_deref() == Some(kid)).collect(),
            None => Vec::new(),
        };
        let candidates: Vec<&Key> = if !named.is_empty() {
            let fit: Vec<&Key> = named.iter().copied().filter(|k| k.accepts(t.alg)).collect();
            if fit.is_empty() {
                return Err(AuthError::AlgorithmMismatch {
                    alg: format!("{:?}", t.alg),
                    kind: named[0].material.kind(),
                });
            }
            fit
        } else if t.kid.is_some() {
            // An unknown kid may still be meant for a PEM key or the secret.
            all()
                .filter(|k| k.kid.is_none() && k.accepts(t.alg))
                .collect()
        } else {
            all().filter(|k| k.accepts(t.alg)).collect()
        };
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey);
        }
        if candidates
            .iter()
            .any(|k| k.material.verify(t.alg, t.signed, &t.signature))
        {
            Ok(())
        } else {
            Err(AuthError::BadSignature)
        }
    }

    /// A refresh (or first `auth` op) on a live connection: replaces the
    /// session's grants and deadline. an error when `sub` differs
    /// ([`SubMismatch`], forbidden); `Ok(removed)` lists the subscriptions no longer covered.
    pub fn refresh<'p>(
        &self,
        session: &mut Session,
        id: Identity,
        patterns: impl Iterator<Item = &'p str>,
    ) -> Result<(u64, Vec<&'p str>), SubMismatch> {
        if session.sub.as_ref().is_some_and(|s| *s != id.sub) {
            return Err(SubMismatch);
        }
        let exp = id.exp;
        let removed = patterns.filter(|p| !id.grants.may_subscribe(p)).collect();
        *session = self.session(id);
        session.rearm = true;
        Ok((exp, removed))
    }
}

/// A refresh whose `sub` is not the connection's (error `forbidden`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubMismatch;

/// When a connection must be closed unless something changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The moment.
    pub at: Instant,
    /// Close code and reason.
    pub close: (u16, &'static str),
}

/// One connection's identity and permissions.
#[derive(Debug, Clone)]
pub struct Session {
    /// `sub` of the token; `None` while anonymous.
    pub sub: Option<String>,
    /// What it may do.
    pub grants: Grants,
    /// Expiry (4001) or authentication deadline (4003).
    pub due: Option<Due>,
    /// Set when `due` changed: the connection re-arms its timer.
    pub rearm: bool,
}

/// Where a token came from on the upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer`.
    Header,
    /// `Sec-WebSocket-Protocol: wsbroker.bearer.<jwt>`.
    Subprotocol,
    /// `?token=`.
    Query,
}

/// The tokens an upgrade request carried (never logged).
#[derive(Default, Clone, PartialEq, Eq)]
pub struct Presented {
    /// Each token and where it was.
    pub tokens: Vec<(TokenSource, String)>,
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sources: Vec<_> = self.tokens.iter().map(|(s, _)| s).collect();
        f.debug_struct("Presented")
            .field("sources", &sources)
            .finish()
    }
}

/// The session of an upgrade request, or why it gets a 401.
pub async fn admit(auth: &Authenticator, presented: &Presented) -> Result<Session, AuthError> {
    if !auth.settings.allow_query_token
        && presented
            .tokens
            .iter()
            .any(|(s, _)| *s == TokenSource::Query)
    {
        return Err(AuthError::QueryNotAllowed);
    }
    match presented.tokens.as_slice() {
        [] => Ok(auth.anonymous_session()),
        [(_, token)] => Ok(auth.session(auth.verify(token).await?)),
        _ => Err(AuthError::Several),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_exp_does_not_overflow_the_deadline() {
        let settings = crate::config::Settings::dev_defaults().auth;
        let auth = Authenticator::load(&settings, None).expect("mode none loads");
        let session = auth.session(Identity {
            sub: "u".into(),
            exp: u64::MAX,
            grants: Grants::default(),
        });
        let due = session.due.expect("an expiry");
        assert!(due.at > Instant::now() + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(due.close, EXPIRED_CLOSE);
    }
}
