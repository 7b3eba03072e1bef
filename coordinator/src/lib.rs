//! liandan-coordinator: the control plane — job specs, the SQLite store, scheduling,
//! membership with leases, the sample ledger's owner, checkpoint commits, and the gRPC service.
//!
//! # Layout
//! - [`spec`]: TOML job specs → validated [`spec::JobSpec`] and per-phase [`spec::PhasePlan`].
//! - [`store`]: SQLite (WAL, migrations): jobs, phases, workers, metrics, checkpoints, datasets.
//! - [`membership`]: worker secrets and leases, in memory.
//! - [`limits`]: every bound on what the coordinator is sent.
//! - [`scheduler`]: group formation, generations, re-forms on loss, join and drain.
//! - [`service`]: the tonic implementation of `liandan.v1.Coordinator`.
//! - [`auth`]: which token each call needs; the tower layer that checks it and times calls.
//! - [`metrics`]: Prometheus text exposition.
//! - [`http`]: the dashboard, its JSON API and `/metrics` (axum, own port).
//! - [`serve`]: the server with health and reflection, behind [`auth`], optionally over TLS.

pub mod auth;
pub mod http;
pub mod incoming;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod rl_watch;
pub mod scheduler;
pub mod service;
pub mod spec;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use liandan_proto::auth::TlsFiles;
use liandan_proto::v1::coordinator_server::CoordinatorServer;
use service::{CoordinatorConfig, CoordinatorService};

/// Calls one connection may have in flight, and HTTP/2 streams it may open. A worker makes one
/// call at a time from each of two tasks; the CLI one; a watch holds one stream.
const CALLS_PER_CONNECTION: usize = 32;
const STREAMS_PER_CONNECTION: u32 = 64;

/// The largest gRPC message the coordinator decodes; larger ones are refused with OUT_OF_RANGE
/// before they are decoded. A job spec is a few KiB; this leaves room for long inline specs.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Who may call the coordinator and how it is reached.
#[derive(Debug, Default)]
pub struct ServeOptions {
    /// The accepted tokens ([`auth::Auth::insecure`] for none).
    pub auth: auth::Auth,
    /// TLS: the coordinator's certificate and key, and the cluster CA that client certificates
    /// must be signed by (None: plain HTTP/2).
    pub tls: Option<TlsFiles>,
    /// Where the dashboard, the JSON API and `/metrics` are served (None: not served).
    pub http: Option<tokio::net::TcpListener>,
}

/// Errors starting the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("listen {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Server(String),
    #[error(transparent)]
    Credentials(#[from] liandan_proto::auth::AuthError),
}

/// Opens the store and serves on `listener` until `shutdown` resolves.
pub async fn serve(
    store_path: &Path,
    listener: tokio::net::TcpListener,
    config: CoordinatorConfig,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = store::Store::open(store_path)?;
    let svc = CoordinatorService::new(store, config)?;
    svc.spawn_scheduler();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    spawn_store_probe(svc.clone(), health_reporter, healthy.clone());
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(liandan_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Server(e.to_string()))?;
    let incoming = incoming::Incoming::new(listener, "gRPC").map_err(|e| ServeError::Server(e.to_string()))?.into_stream();
    let rpc_metrics = svc.rpc.clone();
    let auth = Arc::new(opts.auth);
    let edge = auth::GrpcEdge { auth: auth.clone(), metrics: rpc_metrics.clone() };
    // One shutdown signal for both servers.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let http = opts.http.map(|l| incoming::Incoming::new(l, "HTTP")).transpose().map_err(|e| ServeError::Server(e.to_string()))?;
    let http_task = http.map(|listener| {
        let app = http::router(http::HttpState { svc: svc.clone(), auth: auth.clone(), rpc: rpc_metrics.clone(), healthy: healthy.clone() });
        tokio::spawn(async move {
            let stop = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!("HTTP server: {e}");
            }
        })
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        let identity = tls.identity()?.ok_or_else(|| ServeError::Server("TLS needs --tls-cert and --tls-key".into()))?;
        let mut c = tonic::transport::ServerTlsConfig::new().identity(identity).timeout(incoming::FIRST_BYTES_TIMEOUT);
        if let Some(ca) = tls.ca()? {
            c = c.client_ca_root(ca);
        }
        builder = builder.tls_config(c).map_err(|e| ServeError::Server(format!("TLS: {e}")))?;
    }
    builder
        // One connection cannot take every worker thread, nor open streams without end; dead
        // peers are found by keepalive pings.
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .layer(edge)
        .add_service(health)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(svc).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| ServeError::Server(e.to_string()))?;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    Ok(())
}

/// How often the store is probed for the health check.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Probes the store every [`PROBE_EVERY`]: while it cannot be written (deleted, replaced, disk
/// full, read-only), gRPC health says NOT_SERVING and `/healthz` fails, so an orchestrator
/// restarts or replaces the coordinator instead of sending it work it cannot record.
fn spawn_store_probe(svc: CoordinatorService, reporter: tonic_health::server::HealthReporter, healthy: Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(PROBE_EVERY);
        loop {
            iv.tick().await;
            let s = svc.clone();
            let ok = match tokio::task::spawn_blocking(move || s.probe()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    if healthy.load(Ordering::Relaxed) {
                        tracing::error!("{e}: reporting NOT_SERVING until the store can be written again");
                    }
                    false
                }
                Err(_) => false,
            };
            if ok != healthy.swap(ok, Ordering::Relaxed) {
                if ok {
                    tracing::info!("the store can be written again: SERVING");
                    reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
                } else {
                    reporter.set_not_serving::<CoordinatorServer<CoordinatorService>>().await;
                }
            }
        }
    });
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| ServeError::Bind { addr: addr.to_string(), source: e })?;
    let a = l.local_addr().map_err(|e| ServeError::Bind { addr: addr.to_string(), source: e })?;
    Ok((l, a))
}
