//! The plain-HTTP admin listener (CONTRACT §6): `/metrics`, `/healthz`,
//! `/readyz` and the bearer-token `POST /publish`. Each request runs in its
//! own task with header and body limits, so a slow or broken admin client
//! cannot stall the broker.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::protocol::{self, HttpPublish};
use crate::server::Shared;

/// A whole admin exchange must finish within this.
const REQUEST_BUDGET: Duration = Duration::from_secs(30);

/// Admin connections served at once; beyond this new ones are closed at once,
/// so a flood of idle admin clients cannot take the broker's file descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin endpoints until the daemon is cut.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // max_connections only changes with a restart; publish it once for alerts.
    crate::metrics::record_max_connections(
        shared.metrics,
        shared.settings.load().server.max_connections,
    );
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shared.hard.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "too many admin connections; closing");
            drop(tcp);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            if let Ok(Err(e)) = tokio::time::timeout(REQUEST_BUDGET, conn).await {
                debug!(%peer, error = %e, "admin connection error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = text(status, body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message }).to_string())
}

async fn route(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut resp = text(StatusCode::OK, crate::metrics::render());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if !shared.ready.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if let Some(reason) = cluster_unready(shared) {
                text(StatusCode::SERVICE_UNAVAILABLE, reason + "\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::POST, "/publish") => publish(req, shared).await,
        (_, "/metrics" | "/healthz" | "/readyz" | "/publish") => {
            let allow = if path == "/publish" {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// CONTRACT §11: 503 once the NATS link has been down `cluster.unready_after`.
fn cluster_unready(shared: &Shared) -> Option<String> {
    shared.cluster.as_ref()?.unready_reason()
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return false;
    };
    // The auth scheme is case-insensitive (RFC 9110 11.1).
    let value = value.as_bytes();
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given = &value[7..];
    // Constant time: the comparison must not leak how much of the token matched.
    bool::from(given.ct_eq(token.as_bytes()))
}

async fn publish(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let settings = shared.settings.load();
    let token = &settings.admin.publish_token;
    if token.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "POST /publish is disabled (admin.publish_token is empty)",
        );
    }
    if !authorized(&req, token) {
        let mut resp = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        resp.headers_mut()
            .insert("WWW-Authenticate", HeaderValue::from_static("Bearer"));
        return resp;
    }
    let limit = settings.server.max_message_size;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        // 400, not 413: CONTRACT §6 answers every bad body with 400.
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("body larger than server.max_message_size ({limit} bytes)"),
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")),
    };
    let Ok(body_text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not UTF-8");
    };
    // serde would also take the fields positionally from an array.
    if !body_text.trim_start().starts_with('{') {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be a JSON object {\"topic\":\"…\",\"data\":<json>}",
        );
    }
    let parsed: HttpPublish<'_> = match serde_json::from_str(body_text) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("body must be {{\"topic\":\"…\",\"data\":<json>}}: {e}"),
            )
        }
    };
    if let Err(reason) = protocol::validate_topic(&parsed.topic, false) {
        return error(StatusCode::BAD_REQUEST, &reason);
    }
    if !protocol::depth_within(parsed.data.get(), protocol::MAX_DATA_DEPTH) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "`data` nests deeper than {} levels",
                protocol::MAX_DATA_DEPTH
            ),
        );
    }
    let frame = protocol::message_frame(&parsed.topic, parsed.data.get());
    let fanout = shared.broker.publish(&parsed.topic, &frame);
    shared.metrics.published_http.increment(1);
    json(
        StatusCode::OK,
        format!("{{\"delivered\":{}}}", fanout.delivered),
    )
}
