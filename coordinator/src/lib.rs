//! liandan-coordinator: the control plane (job specs, the SQLite store, scheduling, membership,
//! the sample ledger, the gRPC service).
//!
//! Not built yet: it arrives with the cluster work. Until then training runs in one process
//! through `liandan train`.
