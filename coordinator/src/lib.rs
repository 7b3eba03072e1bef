//! liandan-coordinator: the control plane — job specs, the SQLite store, scheduling,
//! membership with leases, the sample ledger's owner, checkpoint commits, and the gRPC service.
//!
//! # Layout
//! - [`spec`]: TOML job specs → validated [`spec::JobSpec`] and per-phase [`spec::PhasePlan`].
//! - [`store`]: SQLite (WAL, migrations): jobs, phases, workers, metrics, checkpoints, datasets.
//! - [`scheduler`]: group formation, generations, re-forms on loss, join and drain.
//! - [`service`]: the tonic implementation of `liandan.v1.Coordinator`.
//! - [`serve`]: the server with health and reflection.

pub mod scheduler;
pub mod service;
pub mod spec;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;

use liandan_proto::v1::coordinator_server::CoordinatorServer;
use service::{CoordinatorConfig, CoordinatorService};

/// Errors starting the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("listen {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Server(String),
}

/// Opens the store and serves on `listener` until `shutdown` resolves.
pub async fn serve(
    store_path: &Path,
    listener: tokio::net::TcpListener,
    config: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = store::Store::open(store_path)?;
    let svc = CoordinatorService::new(store, config)?;
    svc.spawn_scheduler();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(liandan_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Server(e.to_string()))?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(svc).max_decoding_message_size(16 << 20))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| ServeError::Server(e.to_string()))
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| ServeError::Bind { addr: addr.to_string(), source: e })?;
    let a = l.local_addr().map_err(|e| ServeError::Bind { addr: addr.to_string(), source: e })?;
    Ok((l, a))
}
