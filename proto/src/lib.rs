//! liandan-proto: the liandan/v1 gRPC contract between the coordinator, the workers and users.
//!
//! Not built yet: the `.proto` files and their tonic/prost code generation arrive with the
//! cluster work (coordinator and workers over gRPC). Until then the `liandan` binary runs the
//! engine in one process (`liandan train`, `liandan generate`, `liandan bench`).
