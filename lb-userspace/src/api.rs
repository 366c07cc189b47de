//! The agent's management API: HTTP/1.1 with JSON bodies, and the client the CLI uses to talk to
//! it.
//!
//! Endpoints (all answers are JSON; errors are `{"error": "..."}` with a 4xx/5xx status):
//! - `GET /v1/status` -> [`Status`]
//! - `GET /metrics` -> the Prometheus exposition (text)
//! - `GET /v1/which-backend?vip=ADDR:PORT/PROTO&src=ADDR:PORT` -> [`WhichBackend`]
//! - `GET /v1/flows?vip=VIP&limit=N` -> [`FlowsReport`]: up to `N` flows of the connection table
//!   (default [`DEFAULT_FLOWS_LIMIT`], at most [`MAX_FLOWS_LIMIT`]), of one VIP (name or
//!   `ADDR:PORT/PROTO`) or, without `vip`, of all
//! - `PUT /v1/log-level` with `{"level": "debug"}` -> `{"level": "debug"}`
//! - Operator changes, each `POST` with a JSON body, answered `{"message": "..."}` once the change
//!   is live in the data path (VIPs are named by name or `ADDR:PORT/PROTO`):
//!   - `/v1/backend/drain`, `/v1/backend/undrain`, `/v1/backend/remove`:
//!     `{"vip": "web", "backend": "10.0.0.12"}`
//!   - `/v1/backend/weight`: `{"vip", "backend", "weight": 3}`
//!   - `/v1/backend/add`: `{"vip", "backend", "weight": 1, "backup": false}` (weight and backup
//!     optional)
//!   - `/v1/vip/add`: `{"toml": "[[vip]] ..."}`, one `[[vip]]` table checked exactly like the
//!     config file (errors name the line and field of the fragment)
//!   - `/v1/vip/remove`: `{"vip": "web"}`
//!   - `/v1/reload` (no body) -> `{"changes": ["vip web: backend 10.0.0.13 added", ...]}`
//! - High availability (409 when the node has no `[ha]`), each answered with [`HaReply`]:
//!   - `GET /v1/ha`: the VRRP state
//!   - `POST /v1/ha/handover`: resign mastership; answered once another node is master (409 if
//!     none takes over, and this node takes the VIPs back); the node then does not preempt
//!   - `POST /v1/ha/resume`: end a handover: the node may preempt again
//! - `POST /v1/shutdown` with `{"keep_forwarding": true}` -> [`ShutdownReply`], **on the Unix
//!   socket only** (404 on TCP): the agent stops as on SIGTERM, answering first with what a
//!   replacing agent needs (its pid, program id, HA state). With `keep_forwarding` its data path
//!   stays attached and pinned, and a VRRP master keeps the VIPs and does not resign: this is how
//!   `xdplb run --replace` takes over.
//!
//! Errors: 400 for a malformed request or an invalid config, 404 for an unknown VIP or backend,
//! 409 for a change that clashes with the running state or its capacity (nothing is applied).
//!
//! Handlers never touch the maps: they send a [`Request`] to the agent's reconciler task and wait
//! for its answer, so the reconciler stays the single writer.
//!
//! # Who may call it
//! The same endpoints are served on up to two listeners ([`bind_all`], [`serve_all`]):
//! - **The Unix socket** (`[api] socket`), always. It is created mode 0600, so only root (the
//!   agent's user) can connect; the file permissions are the only guard, no token is asked.
//! - **A TCP address** (`[api] listen`), optional. When `[api] token_file` is set, every request on
//!   it, unknown paths included, must carry `Authorization: Bearer TOKEN` with the file's content
//!   (compared in constant time); otherwise the answer is 401 with
//!   `WWW-Authenticate: Bearer realm="xdplb"`, and the attempt is logged (warn) with the peer
//!   address. Without a token file only a loopback address is served, and then any local user can
//!   use the API: [`bind_all`] refuses a non-loopback address without a token even if the config
//!   was not validated.
//!
//! The token file is read once, when binding; it must be readable by its owner only (like ssh, the
//! agent refuses it otherwise), hold at least 16 printable ASCII bytes without whitespace (a
//! trailing newline is fine). Not guaranteed: confidentiality. The TCP listener speaks plain
//! HTTP, so the token and the answers cross the network in clear; put it on a trusted management
//! network, or behind a TLS-terminating proxy.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{
        ConnectInfo, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use futures::FutureExt as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::{
    config::Protocol,
    logging::LogLevel,
    status::{FlowsReport, Status, WhichBackend},
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
        vip: SocketAddr,
        proto: Protocol,
        src: SocketAddr,
        reply: oneshot::Sender<Result<WhichBackend, Failure>>,
    },
    SetLogLevel {
        level: LogLevel,
        reply: oneshot::Sender<Result<(), Failure>>,
    },
    /// Up to `limit` flows of the connection table, of `vip` (name or `ADDR:PORT/PROTO`) or all.
    Flows {
        vip: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Result<FlowsReport, Failure>>,
    },
    Drain {
        vip: String,
        backend: IpAddr,
        drain: bool,
        reply: oneshot::Sender<Result<String, Failure>>,
    },
    SetWeight {
        vip: String,
        backend: IpAddr,
        weight: u32,
        reply: oneshot::Sender<Result<String, Failure>>,
    },
    AddBackend {
        vip: String,
        backend: IpAddr,
        weight: u32,
        backup: bool,
        reply: oneshot::Sender<Result<String, Failure>>,
    },
    RemoveBackend {
        vip: String,
        backend: IpAddr,
        reply: oneshot::Sender<Result<String, Failure>>,
    },
    AddVip {
        vip: Box<crate::config::Vip>,
        reply: oneshot::Sender<Result<String, Failure>>,
    },
    RemoveVip {
        vip: String,
        reply: oneshot::Sender<Result<String, Failure>>,
    },
    Reload {
        reply: oneshot::Sender<Result<Vec<String>, Failure>>,
    },
    Ha {
        op: HaOp,
        reply: oneshot::Sender<Result<HaReply, Failure>>,
    },
    /// Stop the agent (`POST /v1/shutdown`, Unix socket only). The reply is sent once the agent
    /// has stopped serving, just before its API closes.
    Shutdown {
        keep_forwarding: bool,
        reply: oneshot::Sender<Result<ShutdownReply, Failure>>,
    },
}

/// The body of `POST /v1/shutdown`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownRequest {
    /// Leave the data path attached and pinned (as `--keep-forwarding`), and with `[ha]` keep
    /// the VIPs without resigning, for an agent that takes over at once.
    #[serde(default)]
    pub keep_forwarding: bool,
}

/// The answer to `POST /v1/shutdown`: who is stopping and what the next agent needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReply {
    /// The stopping agent's process id (as it sees itself).
    pub pid: u32,
    pub keep_forwarding: bool,
    /// The program it leaves attached (with `keep_forwarding`).
    pub program_id: Option<u32>,
    /// The VRRP state it stopped in (`master`, `backup`, ...), when it runs `[ha]`. With
    /// `keep_forwarding` a master keeps the VIP addresses and sent no priority-0 advert, so the
    /// next agent should start as master at once.
    pub ha_state: Option<String>,
}

/// How long the client waits for a handover: the longest master-down interval (4 x 40.95 s)
/// and some.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(180);

/// What an HA request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaOp {
    Status,
    Handover,
    Resume,
}

/// The answer to an HA request: what happened, and the state after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaReply {
    /// Empty for a status query.
    pub message: String,
    pub status: crate::ha::HaStatus,
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
    #[error("API listen address {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "API listen address {addr} is not a loopback address: refusing to serve it without a \
         token (set [api] token_file)"
    )]
    NoToken { addr: SocketAddr },
    #[error("API token file {path}: {problem}")]
    TokenFile { path: PathBuf, problem: String },
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

/// The shortest token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;

const TOKEN_HINT: &str = "e.g. `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`";

/// The bearer token TCP clients must send. Never printed.
#[derive(Clone)]
struct Token(Arc<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Reads and checks a token file: owner-only permissions (checked before reading, as ssh
    /// does with private keys), then the content, trimmed: at least [`MIN_TOKEN_LEN`] bytes of
    /// printable ASCII without whitespace.
    fn read(path: &Path) -> Result<Token, ApiError> {
        let problem = |problem: String| ApiError::TokenFile {
            path: path.to_path_buf(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| problem(format!("cannot read it: {e}")))?;
        if !meta.is_file() {
            return Err(problem("not a regular file".to_string()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(problem(format!(
                "permissions {mode:04o} are too open: group or others may read the token; it \
                 must be readable by its owner only (run `chmod 600 {}`)",
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| problem(format!("cannot read it: {e}")))?;
        let token = Token::check(bytes.trim_ascii()).map_err(problem)?;
        Ok(token)
    }

    /// The rules for the content (already trimmed).
    fn check(token: &[u8]) -> Result<Token, String> {
        if token.is_empty() {
            return Err(format!(
                "the file is empty; put a random token in it, {TOKEN_HINT}"
            ));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the token is {} bytes long; use at least {MIN_TOKEN_LEN}, {TOKEN_HINT}",
                token.len()
            ));
        }
        if token.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(
                "the token contains whitespace (only a trailing newline is allowed)".to_string(),
            );
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the token contains bytes other than printable ASCII (they cannot be sent in an \
                 HTTP header)"
                    .to_string(),
            );
        }
        Ok(Token(token.into()))
    }

    /// Constant-time comparison (for a given length): every byte is looked at, whatever matches.
    fn matches(&self, given: &[u8]) -> bool {
        let want = &*self.0;
        if given.len() != want.len() {
            return false;
        }
        let diff = want
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// The API's bound listeners, from [`bind_all`], for [`serve_all`].
#[derive(Debug)]
pub struct Listeners {
    unix: UnixListener,
    unix_path: PathBuf,
    tcp: Option<TcpPart>,
}

#[derive(Debug)]
struct TcpPart {
    listener: TcpListener,
    addr: SocketAddr,
    token: Option<Token>,
}

impl Listeners {
    /// The Unix socket's path.
    pub fn unix_path(&self) -> &Path {
        &self.unix_path
    }

    /// The TCP address actually bound (its port, when `listen` asked for port 0), if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|t| t.addr)
    }

    /// Whether TCP clients must send a bearer token (false without a TCP listener).
    pub fn tcp_token_required(&self) -> bool {
        self.tcp.as_ref().is_some_and(|t| t.token.is_some())
    }
}

/// Binds everything `[api]` asks for: the Unix socket as [`bind`] does, then, if `listen` is set,
/// the TCP address, with the token read from `token_file` if set.
///
/// The token file and the address are checked before anything is bound; a non-loopback address
/// without a token is refused. If the TCP bind fails, the socket just created is removed again.
pub async fn bind_all(api: &crate::config::Api) -> Result<Listeners, ApiError> {
    let token = match (&api.listen, &api.token_file) {
        (Some(_), Some(path)) => Some(Token::read(path)?),
        _ => None,
    };
    if let Some(addr) = api.listen
        && token.is_none()
        && !addr.ip().is_loopback()
    {
        return Err(ApiError::NoToken { addr });
    }
    let unix = bind(&api.socket).await?;
    let tcp = match api.listen {
        None => None,
        Some(addr) => {
            let bound = async {
                let listener = TcpListener::bind(addr).await?;
                let local = listener.local_addr()?;
                Ok::<_, io::Error>((listener, local))
            }
            .await;
            match bound {
                Ok((listener, local)) => Some(TcpPart {
                    listener,
                    addr: local,
                    token,
                }),
                Err(source) => {
                    drop(unix);
                    let _ = std::fs::remove_file(&api.socket);
                    return Err(ApiError::Listen { addr, source });
                }
            }
        }
    };
    Ok(Listeners {
        unix,
        unix_path: api.socket.clone(),
        tcp,
    })
}

/// Serves the API on the Unix socket only, until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    tx: mpsc::Sender<Request>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, unix_only(router(tx.clone()), tx))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the API on every listener until `shutdown` resolves; then each stops accepting and
/// finishes the requests under way. Requests on TCP must carry the token when one was configured
/// (see the module documentation).
pub async fn serve_all(
    listeners: Listeners,
    tx: mpsc::Sender<Request>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let shutdown = shutdown.boxed().shared();
    let Listeners {
        unix,
        unix_path,
        tcp,
    } = listeners;
    let app = router(tx.clone());
    info!(socket = %unix_path.display(), "API listening on the Unix socket (root only)");
    let unix_server =
        axum::serve(unix, unix_only(app.clone(), tx)).with_graceful_shutdown(shutdown.clone());
    let Some(TcpPart {
        listener,
        addr,
        token,
    }) = tcp
    else {
        return unix_server.await;
    };
    let app = match token {
        Some(token) => {
            info!(address = %addr, "API listening on TCP, bearer token required");
            app.layer(middleware::from_fn_with_state(token, require_token))
        }
        None => {
            info!(
                address = %addr,
                "API listening on TCP without a token (loopback: any local user can use it)"
            );
            app
        }
    };
    let tcp_server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown);
    tokio::try_join!(unix_server.into_future(), tcp_server.into_future())?;
    Ok(())
}

fn router(tx: mpsc::Sender<Request>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/which-backend", get(which_backend))
        .route("/v1/flows", get(flows))
        .route("/v1/log-level", put(log_level))
        .route("/v1/backend/drain", post(backend_drain))
        .route("/v1/backend/undrain", post(backend_undrain))
        .route("/v1/backend/weight", post(backend_weight))
        .route("/v1/backend/add", post(backend_add))
        .route("/v1/backend/remove", post(backend_remove))
        .route("/v1/vip/add", post(vip_add))
        .route("/v1/vip/remove", post(vip_remove))
        .route("/v1/reload", post(reload))
        .route("/v1/ha", get(|s| ha(s, HaOp::Status)))
        .route("/v1/ha/handover", post(|s| ha(s, HaOp::Handover)))
        .route("/v1/ha/resume", post(|s| ha(s, HaOp::Resume)))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(tx)
}

/// `app` plus what only the Unix socket serves: `POST /v1/shutdown` (stopping the agent is for
/// root on its host, never for a token holder on the network).
fn unix_only(app: Router, tx: mpsc::Sender<Request>) -> Router {
    app.merge(
        Router::new()
            .route("/v1/shutdown", post(shutdown))
            .with_state(tx),
    )
}

async fn shutdown(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<ShutdownRequest>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match ask(&tx, |reply| Request::Shutdown {
        keep_forwarding: body.keep_forwarding,
        reply,
    })
    .await
    {
        Ok(r) => Json(r).into_response(),
        Err(r) => r,
    }
}

/// The `realm` TCP clients are challenged with on 401.
const CHALLENGE: &str = "Bearer realm=\"xdplb\"";

/// Middleware of the TCP listener: lets a request through only with the right bearer token.
async fn require_token(
    State(token): State<Token>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let refusal = match req.headers().get(header::AUTHORIZATION) {
        None => {
            "this API requires a token: send `Authorization: Bearer TOKEN` (xdplb: --token-file \
             or XDPLB_TOKEN)"
        }
        Some(value) => match split_scheme(value.as_bytes()) {
            Some((scheme, given)) if scheme.eq_ignore_ascii_case(b"bearer") => {
                if token.matches(given.trim_ascii()) {
                    return next.run(req).await;
                }
                "the bearer token is wrong"
            }
            _ => "the Authorization header is not `Bearer TOKEN`",
        },
    };
    warn!(
        peer = %peer,
        method = %req.method(),
        path = req.uri().path(),
        "API request refused: {refusal}"
    );
    let mut resp = error(StatusCode::UNAUTHORIZED, refusal);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(CHALLENGE),
    );
    resp
}

/// `Bearer abc` -> (`Bearer`, `abc`).
fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|b| *b == b' ')?;
    Some((&value[..space], &value[space + 1..]))
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
    let src: SocketAddr = match q.src.parse() {
        Ok(s) => s,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "src: `{}` is not ADDRESS:PORT, like 10.0.0.1:40000 or [2001:db8::1]:40000",
                    q.src
                ),
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

/// Flows `GET /v1/flows` returns when the query sets no `limit`.
pub const DEFAULT_FLOWS_LIMIT: usize = 100;
/// The most flows one request may ask for: the agent reads the table while every other request
/// and health report waits, and the answer is held in memory twice (the entries, their JSON).
pub const MAX_FLOWS_LIMIT: usize = 100_000;

/// `GET /v1/flows`' query as it came. `limit` is text so that a bad one is answered with the
/// allowed range rather than serde's words about integers.
#[derive(Deserialize)]
struct FlowsQuery {
    vip: Option<String>,
    limit: Option<String>,
}

/// The VIP (if any) and the limit of a flows query, or what is wrong with it (answered 400).
fn flows_query(q: FlowsQuery) -> Result<(Option<String>, usize), String> {
    let vip = match q.vip {
        Some(v) if v.trim().is_empty() => {
            return Err(
                "vip: empty; name a VIP (its name or ADDRESS:PORT/PROTO), or leave vip out for \
                 every VIP's flows"
                    .to_string(),
            );
        }
        v => v,
    };
    let limit = match q.limit {
        None => DEFAULT_FLOWS_LIMIT,
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_FLOWS_LIMIT).contains(&n) => n,
            _ => {
                return Err(format!(
                    "limit: `{text}` is not a number of flows from 1 to {MAX_FLOWS_LIMIT}"
                ));
            }
        },
    };
    Ok((vip, limit))
}

async fn flows(
    State(tx): State<mpsc::Sender<Request>>,
    q: Result<Query<FlowsQuery>, QueryRejection>,
) -> Response {
    let parsed = q
        .map_err(|e| e.body_text())
        .and_then(|Query(q)| flows_query(q));
    let (vip, limit) = match parsed {
        Ok(v) => v,
        Err(m) => return bad(m),
    };
    match ask(&tx, |reply| Request::Flows { vip, limit, reply }).await {
        Ok(r) => Json(r).into_response(),
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

/// The body of every operator change.
#[derive(Serialize, Deserialize, Default)]
struct OpBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    toml: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct Message {
    pub message: String,
}

#[derive(Serialize, Deserialize)]
pub struct Changes {
    pub changes: Vec<String>,
}

/// A malformed request: answered 400 with this message.
type OpResult<T> = Result<T, String>;

fn bad(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

fn op_body(body: Result<Json<OpBody>, JsonRejection>) -> OpResult<OpBody> {
    body.map(|Json(b)| b).map_err(|e| e.body_text())
}

fn need<'a>(v: &'a Option<String>, key: &str) -> OpResult<&'a str> {
    v.as_deref().ok_or_else(|| format!("missing `{key}`"))
}

fn backend_of(b: &OpBody) -> OpResult<(String, IpAddr)> {
    let vip = need(&b.vip, "vip")?.to_string();
    let text = need(&b.backend, "backend")?;
    let addr = crate::config::backend_address(text).map_err(|e| format!("backend: {e}"))?;
    Ok((vip, addr))
}

async fn answer(
    tx: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<Result<String, Failure>>) -> Request,
) -> Response {
    match ask(tx, make).await {
        Ok(message) => Json(Message { message }).into_response(),
        Err(r) => r,
    }
}

async fn drain_op(
    tx: mpsc::Sender<Request>,
    body: Result<Json<OpBody>, JsonRejection>,
    drain: bool,
) -> Response {
    let (vip, backend) = match op_body(body).and_then(|b| backend_of(&b)) {
        Ok(v) => v,
        Err(m) => return bad(m),
    };
    answer(&tx, |reply| Request::Drain {
        vip,
        backend,
        drain,
        reply,
    })
    .await
}

async fn backend_drain(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<OpBody>, JsonRejection>,
) -> Response {
    drain_op(tx, body, true).await
}

async fn backend_undrain(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<OpBody>, JsonRejection>,
) -> Response {
    drain_op(tx, body, false).await
}

async fn backend_weight(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<OpBody>, JsonRejection>,
) -> Response {
    let parsed = op_body(body).and_then(|b| {
        let (vip, backend) = backend_of(&b)?;
        let weight = b.weight.ok_or_else(|| "missing `weight`".to_string())?;
        Ok((vip, backend, weight))
    });
    let (vip, backend, weight) = match parsed {
        Ok(v) => v,
        Err(m) => return bad(m),
    };
    answer(&tx, |reply| Request::SetWeight {
        vip,
        backend,
        weight,
        reply,
    })
    .await
}

async fn backend_add(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<OpBody>, JsonRejection>,
) -> Response {
    let parsed = op_body(body).and_then(|b| {
        let (vip, backend) = backend_of(&b)?;
        Ok((
            vip,
            backend,
            b.weight.unwrap_or(crate::config::DEFAULT_WEIGHT),
            b.backup.unwrap_or(false),
        ))
    });
    let (vip, backend, weight, backup) = match parsed {
        Ok(v) => v,
        Err(m) => return bad(m),
    };
    answer(&tx, |reply| Request::AddBackend {
        vip,
        backend,
        weight,
        backup,
        reply,
    })
    .await
}

async fn backend_remove(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<OpBody>, JsonRejection>,
) -> Response {
    let (vip, backend) = match op_body(body).and_then(|b| backend_of(&b)) {
        Ok(v) => v,
        Err(m) => return bad(m),
    };
    answer(&tx, |reply| Request::RemoveBackend {
        vip,
        backend,
        reply,
    })
    .await
}

async fn vip_add(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<OpBody>, JsonRejection>,
) -> Response {
    let parsed = op_body(body).and_then(|b| {
        let text = need(&b.toml, "toml")?;
        crate::config::parse_vip(text, Path::new("vip")).map_err(|e| e.to_string())
    });
    let vip = match parsed {
        Ok(v) => Box::new(v),
        Err(m) => return bad(m),
    };
    answer(&tx, |reply| Request::AddVip { vip, reply }).await
}

async fn vip_remove(
    State(tx): State<mpsc::Sender<Request>>,
    body: Result<Json<OpBody>, JsonRejection>,
) -> Response {
    let vip = match op_body(body).and_then(|b| need(&b.vip, "vip").map(str::to_string)) {
        Ok(v) => v,
        Err(m) => return bad(m),
    };
    answer(&tx, |reply| Request::RemoveVip { vip, reply }).await
}

async fn reload(State(tx): State<mpsc::Sender<Request>>) -> Response {
    match ask(&tx, |reply| Request::Reload { reply }).await {
        Ok(changes) => Json(Changes { changes }).into_response(),
        Err(r) => r,
    }
}

async fn ha(State(tx): State<mpsc::Sender<Request>>, op: HaOp) -> Response {
    match ask(&tx, |reply| Request::Ha { op, reply }).await {
        Ok(r) => Json(r).into_response(),
        Err(r) => r,
    }
}

/// Parses `ADDR:PORT/PROTO`, e.g. `10.0.0.100:80/tcp` or `[2001:db8::1]:80/tcp`. The protocol
/// defaults to tcp.
pub fn parse_service(s: &str) -> Result<(SocketAddr, Protocol), String> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p),
        None => (s, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return Err(format!("protocol `{other}` is not tcp or udp")),
    };
    let addr: SocketAddr = addr.parse().map_err(|_| {
        format!(
            "`{addr}` is not ADDRESS:PORT, e.g. 10.0.0.100:80/tcp, or [ADDRESS]:PORT for IPv6, \
             e.g. [2001:db8::1]:80/tcp"
        )
    })?;
    Ok((addr, proto))
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the xdplb agent at {target}: {source} ({hint})")]
    Connect {
        /// The socket path or TCP address.
        target: String,
        /// What to check.
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent at {target}: {message}")]
    Http { target: String, message: String },
    #[error("the agent at {target} answered {status}: {message}")]
    Api {
        target: String,
        status: u16,
        message: String,
    },
    #[error("the agent at {target} did not answer within {after:?}")]
    Timeout { target: String, after: Duration },
}

/// How the client reaches the agent.
#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Tcp {
        addr: SocketAddr,
        token: Option<String>,
    },
}

/// A client of the agent's API, over its Unix socket or its TCP address.
#[derive(Clone)]
pub struct Client {
    transport: Transport,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match &self.transport {
            Transport::Tcp { token: Some(_), .. } => "<redacted>",
            _ => "none",
        };
        f.debug_struct("Client")
            .field("target", &self.target())
            .field("token", &token)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Client {
    /// Talks to the agent on its Unix socket (no token: the socket's permissions guard it).
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            transport: Transport::Unix(socket.into()),
            timeout: Duration::from_secs(10),
        }
    }

    /// Talks to the agent on its TCP address, sending `Authorization: Bearer TOKEN` when `token`
    /// is set (an empty token counts as none).
    pub fn tcp(addr: SocketAddr, token: Option<String>) -> Client {
        Client {
            transport: Transport::Tcp {
                addr,
                token: token.filter(|t| !t.is_empty()),
            },
            timeout: Duration::from_secs(10),
        }
    }

    /// What errors name: the socket path or the TCP address.
    pub fn target(&self) -> String {
        match &self.transport {
            Transport::Unix(path) => path.display().to_string(),
            Transport::Tcp { addr, .. } => addr.to_string(),
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
            target: self.target(),
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
            .map_err(|_| ClientError::Timeout {
                target: self.target(),
                after: self.timeout,
            })?
    }

    async fn call_inner(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, ClientError> {
        let http = |e: &dyn fmt::Display| ClientError::Http {
            target: self.target(),
            message: e.to_string(),
        };
        let body = match body {
            Some(v) => Full::new(Bytes::from(v.to_string())),
            None => Full::new(Bytes::new()),
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::CONTENT_TYPE, "application/json");
        let connect = |hint, source| ClientError::Connect {
            target: self.target(),
            hint,
            source,
        };
        let exchanged = match &self.transport {
            Transport::Unix(path) => {
                let req = req
                    .header(header::HOST, "xdplb")
                    .body(body)
                    .map_err(|e| http(&e))?;
                let stream = UnixStream::connect(path).await.map_err(|e| {
                    let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                        "the API socket is root only: run this as root, or use --api"
                    } else {
                        "is `xdplb run` running? use --socket if its [api] socket is elsewhere"
                    };
                    connect(hint, e)
                })?;
                exchange(stream, req).await
            }
            Transport::Tcp { addr, token } => {
                req = req.header(header::HOST, addr.to_string());
                if let Some(token) = token {
                    let mut value = header::HeaderValue::from_str(&format!("Bearer {token}"))
                        .map_err(|_| {
                            http(&"the token holds characters an HTTP header cannot carry")
                        })?;
                    value.set_sensitive(true);
                    req = req.header(header::AUTHORIZATION, value);
                }
                let req = req.body(body).map_err(|e| http(&e))?;
                let stream = TcpStream::connect(addr).await.map_err(|e| {
                    connect(
                        "is `xdplb run` running with [api] listen at this address? use --api or \
                         XDPLB_API to point elsewhere",
                        e,
                    )
                })?;
                let _ = stream.set_nodelay(true);
                exchange(stream, req).await
            }
        };
        let (status, bytes) = exchanged.map_err(|e| http(&e))?;
        if !status.is_success() {
            let mut message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            if status == StatusCode::UNAUTHORIZED {
                message.push_str(match &self.transport {
                    Transport::Tcp { token: None, .. } => {
                        " (pass the API token with --token-file FILE or the XDPLB_TOKEN \
                         environment variable)"
                    }
                    _ => {
                        " (the token passed with --token-file or XDPLB_TOKEN is not the one in \
                         the agent's [api] token_file)"
                    }
                });
            }
            return Err(ClientError::Api {
                target: self.target(),
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

    /// Up to `limit` flows of the connection table, of `vip` (name or `ADDR:PORT/PROTO`) or of
    /// every VIP.
    pub async fn flows(&self, vip: Option<&str>, limit: usize) -> Result<FlowsReport, ClientError> {
        let mut q = format!("/v1/flows?limit={limit}");
        if let Some(vip) = vip {
            q.push_str("&vip=");
            q.push_str(&urlencode(vip));
        }
        self.call("GET", &q, None).await
    }

    async fn op(&self, path: &str, body: OpBody) -> Result<String, ClientError> {
        let body = serde_json::to_value(body).map_err(|e| ClientError::Http {
            target: self.target(),
            message: e.to_string(),
        })?;
        let m: Message = self.call("POST", path, Some(body)).await?;
        Ok(m.message)
    }

    fn backend_body(vip: &str, backend: IpAddr) -> OpBody {
        OpBody {
            vip: Some(vip.to_string()),
            backend: Some(backend.to_string()),
            ..Default::default()
        }
    }

    /// Drains (`drain`) or undrains a backend; returns the agent's message.
    pub async fn drain(
        &self,
        vip: &str,
        backend: IpAddr,
        drain: bool,
    ) -> Result<String, ClientError> {
        let path = if drain {
            "/v1/backend/drain"
        } else {
            "/v1/backend/undrain"
        };
        self.op(path, Self::backend_body(vip, backend)).await
    }

    pub async fn set_weight(
        &self,
        vip: &str,
        backend: IpAddr,
        weight: u32,
    ) -> Result<String, ClientError> {
        let body = OpBody {
            weight: Some(weight),
            ..Self::backend_body(vip, backend)
        };
        self.op("/v1/backend/weight", body).await
    }

    pub async fn add_backend(
        &self,
        vip: &str,
        backend: IpAddr,
        weight: u32,
        backup: bool,
    ) -> Result<String, ClientError> {
        let body = OpBody {
            weight: Some(weight),
            backup: Some(backup),
            ..Self::backend_body(vip, backend)
        };
        self.op("/v1/backend/add", body).await
    }

    pub async fn remove_backend(&self, vip: &str, backend: IpAddr) -> Result<String, ClientError> {
        self.op("/v1/backend/remove", Self::backend_body(vip, backend))
            .await
    }

    /// Adds the VIP described by `toml` (one `[[vip]]` table with its backends).
    pub async fn add_vip(&self, toml: &str) -> Result<String, ClientError> {
        let body = OpBody {
            toml: Some(toml.to_string()),
            ..Default::default()
        };
        self.op("/v1/vip/add", body).await
    }

    pub async fn remove_vip(&self, vip: &str) -> Result<String, ClientError> {
        let body = OpBody {
            vip: Some(vip.to_string()),
            ..Default::default()
        };
        self.op("/v1/vip/remove", body).await
    }

    /// The VRRP state (`GET /v1/ha`).
    pub async fn ha_status(&self) -> Result<HaReply, ClientError> {
        self.call("GET", "/v1/ha", None).await
    }

    /// Resigns mastership and waits until another node is master (`POST /v1/ha/handover`).
    /// That takes up to the master-down interval (about 3.6 advert intervals, at most 164 s),
    /// so this one call waits longer than the others.
    pub async fn ha_handover(&self) -> Result<HaReply, ClientError> {
        let mut c = self.clone();
        c.timeout = c.timeout.max(HANDOVER_TIMEOUT);
        c.call("POST", "/v1/ha/handover", None).await
    }

    /// Ends a handover (`POST /v1/ha/resume`).
    pub async fn ha_resume(&self) -> Result<HaReply, ClientError> {
        self.call("POST", "/v1/ha/resume", None).await
    }

    /// Asks the agent to stop (`POST /v1/shutdown`; Unix socket only), leaving its data path
    /// attached if `keep_forwarding`. Answered once it has stopped serving; it exits soon after.
    pub async fn shutdown(&self, keep_forwarding: bool) -> Result<ShutdownReply, ClientError> {
        let body = serde_json::to_value(ShutdownRequest { keep_forwarding }).map_err(|e| {
            ClientError::Http {
                target: self.target(),
                message: e.to_string(),
            }
        })?;
        let mut c = self.clone();
        // The agent answers after stopping its health checks and HA (bounded by its own
        // shutdown steps, 5 s each).
        c.timeout = c.timeout.max(Duration::from_secs(30));
        c.call("POST", "/v1/shutdown", Some(body)).await
    }

    /// Asks the agent to re-read its config file; returns what changed.
    pub async fn reload(&self) -> Result<Vec<String>, ClientError> {
        let c: Changes = self.call("POST", "/v1/reload", None).await?;
        Ok(c.changes)
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

/// One HTTP/1.1 request on a fresh connection: the status and the whole body.
async fn exchange<S>(
    stream: S,
    req: hyper::Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
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
        assert_eq!(
            parse_service("[2001:db8::1]:53/udp").unwrap(),
            ("[2001:db8::1]:53".parse().unwrap(), Protocol::Udp)
        );
        assert!(
            parse_service("2001:db8::1:80/tcp")
                .unwrap_err()
                .contains("[ADDRESS]:PORT for IPv6")
        );
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

    fn flows_q(vip: Option<&str>, limit: Option<&str>) -> Result<(Option<String>, usize), String> {
        flows_query(FlowsQuery {
            vip: vip.map(String::from),
            limit: limit.map(String::from),
        })
    }

    #[test]
    fn flows_queries_parse() {
        assert_eq!(flows_q(None, None).unwrap(), (None, DEFAULT_FLOWS_LIMIT));
        assert_eq!(
            flows_q(Some("web"), Some("5")).unwrap(),
            (Some("web".to_string()), 5)
        );
        assert_eq!(
            flows_q(Some("10.0.0.100:80/tcp"), Some("100000")).unwrap(),
            (Some("10.0.0.100:80/tcp".to_string()), MAX_FLOWS_LIMIT)
        );
        for bad in [
            "0",
            "-1",
            "abc",
            "1.5",
            "100001",
            "",
            "99999999999999999999999",
        ] {
            let e = flows_q(None, Some(bad)).unwrap_err();
            assert_eq!(
                e,
                format!("limit: `{bad}` is not a number of flows from 1 to 100000"),
                "{bad}"
            );
        }
        for empty in ["", "  "] {
            let e = flows_q(Some(empty), None).unwrap_err();
            assert!(e.starts_with("vip: empty;"), "{e}");
        }
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(urlencode("10.0.0.1:80/tcp"), "10.0.0.1:80%2Ftcp");
    }

    /// A path under the temp dir, unique to this process and test, removed on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(name: &str) -> TempPath {
            let path =
                std::env::temp_dir().join(format!("xdplb-api-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            TempPath(path)
        }

        fn write(name: &str, content: &str, mode: u32) -> TempPath {
            let p = TempPath::new(name);
            std::fs::write(&p.0, content).unwrap();
            std::fs::set_permissions(&p.0, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const TOKEN: &str = "0123456789abcdef-the-token";

    fn api(socket: &TempPath, listen: &str, token_file: Option<&TempPath>) -> crate::config::Api {
        crate::config::Api {
            socket: socket.0.clone(),
            listen: Some(listen.parse().unwrap()),
            token_file: token_file.map(|t| t.0.clone()),
        }
    }

    /// A minimal status, from JSON so that fields added to [`Status`] with a serde default do
    /// not concern this test.
    fn sample_status() -> Status {
        serde_json::from_value(serde_json::json!({
            "version": "test",
            "interface": "lo",
            "ifindex": 1,
            "interface_mac": "00:00:00:00:00:00",
            "xdp_mode": null,
            "program_id": null,
            "uptime_secs": 7,
            "log_level": "info",
            "table_rebuilds": 0,
            "vips": [],
            "reasons": [],
        }))
        .expect("a minimal Status")
    }

    #[tokio::test]
    async fn operator_changes_reach_the_reconciler_and_bad_requests_do_not() {
        let dir = std::env::temp_dir().join(format!("xdplb-api-op-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("op.sock");
        let api = crate::config::Api {
            socket: sock.clone(),
            ..Default::default()
        };
        let (stop, server) = start(bind_all(&api).await.unwrap());
        let client = Client::new(&sock);
        let b: IpAddr = "10.0.0.12".parse().unwrap();
        assert_eq!(
            client.drain("web", b, true).await.unwrap(),
            "drained in web"
        );
        // Checked before the reconciler sees it: a multicast backend, a vip fragment with an
        // error, a missing field.
        let e = client
            .drain("web", "224.0.0.1".parse().unwrap(), true)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Api { status: 400, message, .. } if message.contains("multicast")),
            "{e}"
        );
        let e = client
            .add_vip("[[vip]]\naddress = \"10.0.0.100\"\nport = 0\nprotocol = \"tcp\"\n")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Api { status: 400, message, .. } if message.contains("vip[0].port")),
            "{e}"
        );
        let e = client
            .op("/v1/backend/weight", Client::backend_body("web", b))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("missing `weight`"), "{e}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Serves `listeners` with a fake reconciler answering status; returns the shutdown trigger
    /// and the server task.
    fn start(
        listeners: Listeners,
    ) -> (oneshot::Sender<()>, tokio::task::JoinHandle<io::Result<()>>) {
        let (tx, mut rx) = mpsc::channel::<Request>(4);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                match req {
                    Request::Status(reply) => {
                        let _ = reply.send(Ok(sample_status()));
                    }
                    Request::WhichBackend { reply, .. } => {
                        let _ = reply.send(Err(Failure::not_found("no such vip")));
                    }
                    Request::SetLogLevel { reply, .. } => {
                        let _ = reply.send(Ok(()));
                    }
                    Request::Flows { vip, limit, reply } => {
                        let _ = reply.send(fake_flows(vip, limit));
                    }
                    Request::Drain { vip, reply, .. } => {
                        let _ = reply.send(Ok(format!("drained in {vip}")));
                    }
                    Request::Shutdown {
                        keep_forwarding,
                        reply,
                    } => {
                        let _ = reply.send(Ok(ShutdownReply {
                            pid: 7,
                            keep_forwarding,
                            program_id: Some(9),
                            ha_state: Some("master".into()),
                        }));
                    }
                    _ => {}
                }
            }
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_all(listeners, tx, async move {
            let _ = stop_rx.await;
        }));
        (stop_tx, server)
    }

    /// What the fake reconciler answers a flows request: the VIP and limit it was asked for,
    /// echoed in the flow and in `scanned`; "nope" is an unknown VIP.
    fn fake_flows(vip: Option<String>, limit: usize) -> Result<FlowsReport, Failure> {
        if vip.as_deref() == Some("nope") {
            return Err(Failure::not_found("no VIP named nope"));
        }
        Ok(FlowsReport {
            capacity: 1024,
            capacity_v6: 1024,
            scanned: limit,
            scan_capped: false,
            flows: vec![crate::status::FlowStatus {
                client: "192.0.2.1:40000".into(),
                service: "10.0.0.100:80/tcp".into(),
                vip,
                backend_id: 1,
                backend: Some("10.0.0.11".into()),
                state: "stays".into(),
                idle_secs: 1.5,
            }],
        })
    }

    #[tokio::test]
    async fn flows_reach_the_reconciler_and_bad_queries_do_not() {
        let sock = TempPath::new("flows.sock");
        let api = crate::config::Api {
            socket: sock.0.clone(),
            ..Default::default()
        };
        let (stop, server) = start(bind_all(&api).await.unwrap());
        let client = Client::new(&sock.0);
        let all = client.flows(None, DEFAULT_FLOWS_LIMIT).await.unwrap();
        assert_eq!((all.flows[0].vip.as_deref(), all.scanned), (None, 100));
        // A service's slash survives the query string.
        let one = client.flows(Some("10.0.0.100:80/tcp"), 7).await.unwrap();
        assert_eq!(
            (one.flows[0].vip.as_deref(), one.scanned),
            (Some("10.0.0.100:80/tcp"), 7)
        );
        // Without a limit the agent takes its default.
        let raw = client
            .call_raw("GET", "/v1/flows?vip=web", None)
            .await
            .unwrap();
        let r: FlowsReport = serde_json::from_slice(&raw).unwrap();
        assert_eq!((r.flows[0].vip.as_deref(), r.scanned), (Some("web"), 100));

        let e = client.flows(Some("nope"), 10).await.unwrap_err();
        let text = e.to_string();
        assert_eq!(status_code(e), 404);
        assert!(text.contains("no VIP named nope"), "{text}");
        for limit in [0, MAX_FLOWS_LIMIT + 1] {
            let e = client.flows(None, limit).await.unwrap_err();
            let text = e.to_string();
            assert_eq!(status_code(e), 400, "{limit}");
            assert!(
                text.contains(&format!("limit: `{limit}` is not a number of flows")),
                "{text}"
            );
        }
        for query in ["limit=ten", "limit=-3", "vip=&limit=3"] {
            let e = client
                .call_raw("GET", &format!("/v1/flows?{query}"), None)
                .await
                .unwrap_err();
            let text = e.to_string();
            assert_eq!(status_code(e), 400, "{query}");
            assert!(
                text.contains("limit:") || text.contains("vip: empty"),
                "{text}"
            );
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    fn status_code(e: ClientError) -> u16 {
        match e {
            ClientError::Api { status, .. } => status,
            other => panic!("expected an API error, got {other}"),
        }
    }

    #[tokio::test]
    async fn tcp_requires_the_token_and_unix_does_not() {
        let sock = TempPath::new("serve.sock");
        let token = TempPath::write("serve.token", &format!("{TOKEN}\n"), 0o600);
        let listeners = bind_all(&api(&sock, "127.0.0.1:0", Some(&token)))
            .await
            .unwrap();
        assert!(listeners.tcp_token_required());
        assert_eq!(listeners.unix_path(), sock.0);
        let addr = listeners.tcp_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let (stop, server) = start(listeners);

        // The Unix socket: no token.
        assert_eq!(
            Client::new(&sock.0).status().await.unwrap(),
            sample_status()
        );

        // TCP without a token, with a wrong one (same length and not), then the right one.
        let e = Client::tcp(addr, None).status().await.unwrap_err();
        let text = e.to_string();
        assert_eq!(status_code(e), 401);
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.contains("requires a token"), "{text}");
        assert!(text.contains("--token-file"), "{text}");
        let e = Client::tcp(addr, Some(String::new()))
            .status()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("requires a token"), "{e}");
        for wrong in ["0123456789abcdef-the-tokeN", "short"] {
            let e = Client::tcp(addr, Some(wrong.into()))
                .status()
                .await
                .unwrap_err();
            let text = e.to_string();
            assert_eq!(status_code(e), 401, "{wrong}");
            assert!(text.contains("wrong"), "{text}");
        }
        let right = Client::tcp(addr, Some(TOKEN.into()));
        assert_eq!(right.status().await.unwrap(), sample_status());
        assert!(right.metrics().await.is_ok());
        // The connection table names clients: it is guarded like the rest.
        let e = Client::tcp(addr, None).flows(None, 10).await.unwrap_err();
        assert_eq!(status_code(e), 401);
        assert_eq!(right.flows(Some("web"), 10).await.unwrap().scanned, 10);
        right.set_log_level(LogLevel::Debug).await.unwrap();
        // Unknown paths are guarded too.
        let e = Client::tcp(addr, None)
            .call_raw("GET", "/nope", None)
            .await
            .unwrap_err();
        assert_eq!(status_code(e), 401);

        // One shutdown stops both listeners.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve_all did not stop")
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
        assert!(UnixStream::connect(&sock.0).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_is_served_on_the_unix_socket_only() {
        let sock = TempPath::new("shutdown.sock");
        let token = TempPath::write("shutdown.token", TOKEN, 0o600);
        let listeners = bind_all(&api(&sock, "127.0.0.1:0", Some(&token)))
            .await
            .unwrap();
        let addr = listeners.tcp_addr().unwrap();
        let (stop, server) = start(listeners);
        // Even with the token, TCP does not know the endpoint.
        let e = Client::tcp(addr, Some(TOKEN.into()))
            .shutdown(true)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert_eq!(status_code(e), 404, "{text}");
        let reply = Client::new(&sock.0).shutdown(true).await.unwrap();
        assert_eq!(
            reply,
            ShutdownReply {
                pid: 7,
                keep_forwarding: true,
                program_id: Some(9),
                ha_state: Some("master".into()),
            }
        );
        // The body's field is optional (false), and a malformed body is refused.
        let raw = Client::new(&sock.0)
            .call_raw("POST", "/v1/shutdown", Some(serde_json::json!({})))
            .await
            .unwrap();
        let r: ShutdownReply = serde_json::from_slice(&raw).unwrap();
        assert!(!r.keep_forwarding);
        let e = Client::new(&sock.0)
            .call_raw(
                "POST",
                "/v1/shutdown",
                Some(serde_json::json!({"keep_forwarding": "yes"})),
            )
            .await
            .unwrap_err();
        assert_eq!(status_code(e), 400);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn refusals_carry_the_challenge_and_a_json_error() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let sock = TempPath::new("challenge.sock");
        let token = TempPath::write("challenge.token", TOKEN, 0o600);
        let listeners = bind_all(&api(&sock, "127.0.0.1:0", Some(&token)))
            .await
            .unwrap();
        let addr = listeners.tcp_addr().unwrap();
        let (stop, server) = start(listeners);
        for auth in ["", "Authorization: Basic Zm9vOmJhcg==\r\n"] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(
                    format!(
                        "GET /v1/status HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            let lower = answer.to_ascii_lowercase();
            assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
            assert!(
                lower.contains("\r\nwww-authenticate: bearer realm=\"xdplb\"\r\n"),
                "{answer}"
            );
            let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
            let body: ErrorBody = serde_json::from_str(body).unwrap();
            assert!(!body.error.is_empty());
        }
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn loopback_without_a_token_is_served_openly() {
        let sock = TempPath::new("open.sock");
        let listeners = bind_all(&api(&sock, "127.0.0.1:0", None)).await.unwrap();
        assert!(!listeners.tcp_token_required());
        let addr = listeners.tcp_addr().unwrap();
        let (stop, server) = start(listeners);
        assert!(Client::tcp(addr, None).status().await.is_ok());
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn non_loopback_without_a_token_is_refused() {
        let sock = TempPath::new("noloop.sock");
        let e = bind_all(&api(&sock, "0.0.0.0:0", None)).await.unwrap_err();
        assert!(matches!(e, ApiError::NoToken { .. }), "{e}");
        assert!(e.to_string().contains("token_file"), "{e}");
        // Nothing was bound.
        assert!(!sock.0.exists());
    }

    #[tokio::test]
    async fn bad_token_files_are_refused() {
        let sock = TempPath::new("badtoken.sock");
        let open = TempPath::write("open.token", TOKEN, 0o644);
        let e = bind_all(&api(&sock, "127.0.0.1:0", Some(&open)))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("chmod 600 {}", open.0.display())),
            "{e}"
        );
        assert!(e.contains("0644"), "{e}");

        let short = TempPath::write("short.token", "abc123\n", 0o600);
        let e = bind_all(&api(&sock, "127.0.0.1:0", Some(&short)))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&short.0.display().to_string()), "{e}");
        assert!(e.contains("at least 16"), "{e}");

        let empty = TempPath::write("empty.token", "\n", 0o600);
        let e = bind_all(&api(&sock, "127.0.0.1:0", Some(&empty)))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");

        let spaced = TempPath::write("spaced.token", "0123456789 abcdef\n", 0o600);
        let e = bind_all(&api(&sock, "127.0.0.1:0", Some(&spaced)))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("whitespace"), "{e}");

        let missing = TempPath::new("missing.token");
        let e = bind_all(&api(&sock, "127.0.0.1:0", Some(&missing)))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&missing.0.display().to_string()), "{e}");
        assert!(e.contains("cannot read"), "{e}");

        // Every refusal came before binding.
        assert!(!sock.0.exists());
    }

    #[tokio::test]
    async fn a_busy_tcp_address_is_named_and_the_socket_removed() {
        let busy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = busy.local_addr().unwrap();
        let sock = TempPath::new("busy.sock");
        let e = bind_all(&api(&sock, &addr.to_string(), None))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Listen { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("API listen address {addr}: ")),
            "{e}"
        );
        assert!(!sock.0.exists());
    }

    #[test]
    fn tokens_compare_whole() {
        let t = Token::check(TOKEN.as_bytes()).unwrap();
        assert!(t.matches(TOKEN.as_bytes()));
        assert!(!t.matches(&TOKEN.as_bytes()[1..]));
        assert!(!t.matches(b""));
        assert!(!t.matches(b"0123456789abcdef-the-tokem"));
        assert!(!format!("{t:?}").contains("0123"));
        assert_eq!(
            split_scheme(b"Bearer abc"),
            Some((&b"Bearer"[..], &b"abc"[..]))
        );
        assert_eq!(split_scheme(b"Bearer"), None);
    }

    #[tokio::test]
    async fn client_errors_name_the_target() {
        let sock = TempPath::new("nobody.sock");
        let e = Client::new(&sock.0).status().await.unwrap_err().to_string();
        assert!(e.contains(&sock.0.display().to_string()), "{e}");
        // A port nobody listens on: bind one, then free it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = Client::tcp(addr, None)
            .status()
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
        assert!(e.contains("--api"), "{e}");
    }
}
