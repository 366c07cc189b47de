//! The agent's management API: HTTP/1.1 with JSON bodies on a Unix socket (root only by default),
//! and the client the CLI uses to talk to it.
//!
//! Endpoints (all answers are JSON; errors are `{"error": "..."}` with a 4xx/5xx status):
//! - `GET /v1/status` -> [`Status`]
//! - `GET /v1/which-backend?vip=ADDR:PORT/PROTO&src=ADDR:PORT` -> [`WhichBackend`]
//! - `PUT /v1/log-level` with `{"level": "debug"}` -> `{"level": "debug"}`
//!
//! Handlers never touch the maps: they send a [`Request`] to the agent's reconciler task and wait
//! for its answer, so the reconciler stays the single writer.

use std::{
    io,
    net::SocketAddrV4,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{
        Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    config::Protocol,
    logging::LogLevel,
    status::{Status, WhichBackend},
};

/// Why the agent could not answer a request: the HTTP status and the message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    /// The request names something that does not exist (404).
    pub fn not_found(message: impl Into<String>) -> Failure {
        Failure {
            status: 404,
            message: message.into(),
        }
    }

    /// The agent failed to do what was asked (500).
    pub fn internal(message: impl Into<String>) -> Failure {
        Failure {
            status: 500,
            message: message.into(),
        }
    }
}

/// A question or command for the agent's reconciler task.
pub enum Request {
    Status(oneshot::Sender<Result<Status, Failure>>),
    WhichBackend {
        vip: SocketAddrV4,
        proto: Protocol,
        src: SocketAddrV4,
        reply: oneshot::Sender<Result<WhichBackend, Failure>>,
    },
    SetLogLevel {
        level: LogLevel,
        reply: oneshot::Sender<Result<(), Failure>>,
    },
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another xdplb agent is already running: its API answers on {path} (stop it first, or \
         give this one another [api] socket)"
    )]
    InUse { path: PathBuf },
}

/// Binds the API socket: creates its directory, replaces a stale socket left by a crashed agent
/// (but refuses if a live agent answers on it), and restricts it to root (mode 0600).
pub async fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let sock_err = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(sock_err)?;
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    Ok(listener)
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    tx: mpsc::Sender<Request>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/which-backend", get(which_backend))
        .route("/v1/log-level", put(log_level))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(tx);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: msg.into() })).into_response()
}

async fn ask<T>(
    tx: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<Result<T, Failure>>) -> Request,
) -> Result<T, Response> {
    let shutting_down = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    };
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).await.map_err(|_| shutting_down())?;
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(f)) => Err(error(
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            f.message,
        )),
        Err(_) => Err(shutting_down()),
    }
}

async fn status(State(tx): State<mpsc::Sender<Request>>) -> Response {
    match ask(&tx, Request::Status).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

async fn metrics(State(tx): State<mpsc::Sender<Request>>) -> Response {
    match ask(&tx, Request::Status).await {
        Ok(s) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::render(&s),
        )
            .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct WhichQuery {
    vip: String,
    src: String,
}

async fn which_backend(
    State(tx): State<mpsc::Sender<Request>>,
    q: Result<Query<WhichQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let (vip, proto) = match parse_service(&q.vip) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("vip: {e}")),
    };
    let src: SocketAddrV4 = match q.src.parse() {
        Ok(s) => s,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("src: `{}` is not ADDRESS:PORT (IPv4)", q.src),
            );
        }
    };
    match ask(&tx, |reply| Request::WhichBackend {
        vip,
        proto,
        src,
        reply,
    })
    .await
    {
        Ok(w) => Json(w).into_response(),
        Err(r) => r,
    }
}

#[derive(Serialize, Deserialize)]
struct LogLevelBody {
    level: String,
}

async fn log_level(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<LogLevelBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let level: LogLevel = match body.level.parse() {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match ask(&tx, |reply| Request::SetLogLevel { level, reply }).await {
        Ok(()) => Json(LogLevelBody {
            level: level.to_string(),
        })
        .into_response(),
        Err(r) => r,
    }
}

/// Parses `ADDR:PORT/PROTO`, e.g. `10.0.0.100:80/tcp`. The protocol defaults to tcp.
pub fn parse_service(s: &str) -> Result<(SocketAddrV4, Protocol), String> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p),
        None => (s, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return Err(format!("protocol `{other}` is not tcp or udp")),
    };
    let addr: SocketAddrV4 = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not ADDRESS:PORT (IPv4), e.g. 10.0.0.100:80/tcp"))?;
    Ok((addr, proto))
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "cannot reach the xdplb agent at {socket}: {source} (is `xdplb run` running? use \
         --socket if its [api] socket is elsewhere)"
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent at {socket}: {message}")]
    Http { socket: PathBuf, message: String },
    #[error("the agent answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// A client of the agent's API.
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: Duration::from_secs(10),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let bytes = self.call_raw(method, path_and_query, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Http {
            socket: self.socket.clone(),
            message: e.to_string(),
        })
    }

    /// The body of a successful response, as it came.
    async fn call_raw(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, ClientError> {
        tokio::time::timeout(self.timeout, self.call_inner(method, path_and_query, body))
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    async fn call_inner(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, ClientError> {
        let http = |e: &dyn std::fmt::Display| ClientError::Http {
            socket: self.socket.clone(),
            message: e.to_string(),
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
        tokio::spawn(conn);
        let body = match body {
            Some(v) => Full::new(Bytes::from(v.to_string())),
            None => Full::new(Bytes::new()),
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", "xdplb")
            .header("content-type", "application/json")
            .body(body)
            .map_err(|e| http(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes)
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call("GET", "/v1/status", None).await
    }

    /// The Prometheus exposition (`GET /metrics`).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let bytes = self.call_raw("GET", "/metrics", None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn which_backend(&self, vip: &str, src: &str) -> Result<WhichBackend, ClientError> {
        let q = format!(
            "/v1/which-backend?vip={}&src={}",
            urlencode(vip),
            urlencode(src)
        );
        self.call("GET", &q, None).await
    }

    pub async fn set_log_level(&self, level: LogLevel) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(
                "PUT",
                "/v1/log-level",
                Some(serde_json::json!({ "level": level.to_string() })),
            )
            .await?;
        Ok(())
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_parse() {
        assert_eq!(
            parse_service("10.0.0.100:80/udp").unwrap(),
            ("10.0.0.100:80".parse().unwrap(), Protocol::Udp)
        );
        assert_eq!(parse_service("10.0.0.100:80").unwrap().1, Protocol::Tcp);
        assert!(
            parse_service("10.0.0.100:80/sctp")
                .unwrap_err()
                .contains("sctp")
        );
        assert!(
            parse_service("10.0.0.100/tcp")
                .unwrap_err()
                .contains("ADDRESS:PORT")
        );
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(urlencode("10.0.0.1:80/tcp"), "10.0.0.1:80%2Ftcp");
    }
}
