//! Access control at the edge: which token each call needs, and the tower layer in front of the
//! gRPC service that checks it and times every call.
//!
//! Roles: the worker token may make the worker calls ([`WORKER_METHODS`]); the admin token may
//! make every call, worker calls included (whoever holds it can already cancel every job, so
//! refusing it worker calls would add no safety). Only `grpc.health.v1.Health` is public. A
//! method not listed here, such as one added to the proto later, needs the admin token.
//!
//! Refusals: no or unknown token → UNAUTHENTICATED; a worker token on an admin call →
//! PERMISSION_DENIED. Each is logged with the method and the peer address (never the token)
//! and counted in `liandan_rpc_refused_total`; the call's body is never read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use liandan_proto::auth::{TokenSource, bearer};
use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::metrics::RpcMetrics;

/// The calls a worker makes, by gRPC method name.
pub const WORKER_METHODS: &[&str] =
    &["Register", "Heartbeat", "NextAssignment", "ReportStep", "CommitCheckpoint", "FinishAssignment", "PublishRendezvous", "FetchRendezvous", "SubmitSamples"];

const SERVICE_PREFIX: &str = "/liandan.v1.Coordinator/";
const PUBLIC_PREFIXES: &[&str] = &["/grpc.health.v1.Health/"];

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Public,
    Worker,
    Admin,
}

/// The role a gRPC path (`/package.Service/Method`) needs.
pub fn required(path: &str) -> Role {
    if PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Role::Public;
    }
    match path.strip_prefix(SERVICE_PREFIX) {
        Some(m) if WORKER_METHODS.contains(&m) => Role::Worker,
        _ => Role::Admin,
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoToken,
    UnknownToken,
    WorkerTokenOnAdminCall,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoToken => "no bearer token",
            Refusal::UnknownToken => "unknown token",
            Refusal::WorkerTokenOnAdminCall => "a worker token on an admin call",
        }
    }

    pub fn status(self, what: &str) -> Status {
        match self {
            Refusal::NoToken => Status::unauthenticated(format!("{what} needs a bearer token (authorization: Bearer TOKEN; the CLI reads LIANDAN_ADMIN_TOKEN or --token-file)")),
            Refusal::UnknownToken => Status::unauthenticated(format!("{what}: the token is not valid")),
            Refusal::WorkerTokenOnAdminCall => Status::permission_denied(format!("{what} needs the admin token; a worker token may only make worker calls")),
        }
    }

    pub fn http_status(self) -> u16 {
        if self == Refusal::WorkerTokenOnAdminCall { 403 } else { 401 }
    }
}

/// The accepted tokens. Both None: no authentication (`--insecure-no-auth`, loopback only).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    admin: Option<TokenSource>,
    worker: Option<TokenSource>,
}

impl Auth {
    /// Tokens for both roles.
    pub fn new(admin: TokenSource, worker: TokenSource) -> Self {
        Auth { admin: Some(admin), worker: Some(worker) }
    }

    /// Every call allowed; the CLI permits this only on a loopback address.
    pub fn insecure() -> Self {
        Auth::default()
    }

    pub fn is_insecure(&self) -> bool {
        self.admin.is_none() && self.worker.is_none()
    }

    /// Checks the `authorization` header value for a call that needs `need`.
    pub fn check(&self, need: Role, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if need == Role::Public || self.is_insecure() {
            return Ok(());
        }
        let token = bearer(authorization).ok_or(Refusal::NoToken)?;
        // Both comparisons always run, so the time does not tell which role matched.
        let admin = self.admin.as_ref().is_some_and(|s| s.accepts(token));
        let worker = self.worker.as_ref().is_some_and(|s| s.accepts(token));
        match need {
            _ if admin => Ok(()),
            Role::Worker if worker => Ok(()),
            Role::Admin if worker => Err(Refusal::WorkerTokenOnAdminCall),
            _ => Err(Refusal::UnknownToken),
        }
    }
}

/// The peer's address from a request's connection info (plain TCP or TLS).
pub fn peer<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TcpConnectInfo>()
        .and_then(|c| c.remote_addr())
        .or_else(|| req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|c| c.get_ref().remote_addr()))
}

/// The tower layer in front of every gRPC service of the coordinator.
#[derive(Debug, Clone)]
pub struct GrpcEdge {
    pub auth: Arc<Auth>,
    pub metrics: Arc<RpcMetrics>,
}

impl<S> Layer<S> for GrpcEdge {
    type Service = GrpcEdgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcEdgeService { inner, edge: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcEdgeService<S> {
    inner: S,
    edge: GrpcEdge,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for GrpcEdgeService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let method = path.rsplit('/').next().unwrap_or_default().to_string();
        let need = required(&path);
        if let Err(refusal) = self.edge.auth.check(need, req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes())) {
            let status = refusal.status(&method);
            let peer = peer(&req).map_or_else(|| "unknown".to_string(), |a| a.to_string());
            tracing::warn!(method = %method, peer = %peer, code = ?status.code(), "refused a call: {}", refusal.reason());
            self.edge.metrics.refused(&method, status.code());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // The clone serves this call; `self.inner` stays ready for the next (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.edge.metrics.clone();
        let started = Instant::now();
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // Errors travel in the headers (trailers-only responses); a success's status is in
            // the trailers, after the body: no grpc-status header means the call got going.
            let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok()).map_or(tonic::Code::Ok, tonic::Code::from);
            if need != Role::Public {
                metrics.observe(&method, code, started.elapsed());
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_refusals() {
        assert_eq!(required("/grpc.health.v1.Health/Check"), Role::Public);
        assert_eq!(required("/liandan.v1.Coordinator/Heartbeat"), Role::Worker);
        assert_eq!(required("/liandan.v1.Coordinator/SubmitJob"), Role::Admin);
        assert_eq!(required("/liandan.v1.Coordinator/SomethingNew"), Role::Admin, "unlisted methods are admin-only");
        assert_eq!(required("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Role::Admin);
        let a = Auth::new(TokenSource::literal("admin-0123456789abcdef", "a").unwrap(), TokenSource::literal("worker-0123456789abcdef", "w").unwrap());
        let (admin, worker) = (&b"Bearer admin-0123456789abcdef"[..], &b"Bearer worker-0123456789abcdef"[..]);
        assert_eq!(a.check(Role::Admin, Some(admin)), Ok(()));
        assert_eq!(a.check(Role::Worker, Some(admin)), Ok(()), "the admin token may make worker calls");
        assert_eq!(a.check(Role::Worker, Some(worker)), Ok(()));
        assert_eq!(a.check(Role::Admin, Some(worker)), Err(Refusal::WorkerTokenOnAdminCall));
        assert_eq!(a.check(Role::Admin, None), Err(Refusal::NoToken));
        assert_eq!(a.check(Role::Worker, Some(b"Bearer admin-0123456789abcdeX")), Err(Refusal::UnknownToken));
        assert_eq!(a.check(Role::Public, None), Ok(()));
        assert_eq!(Auth::insecure().check(Role::Admin, None), Ok(()));
    }
}
