//! liandan-proto: the liandan/v1 gRPC contract (`liandan/v1/liandan.proto`) between the
//! coordinator, the workers and users, generated with tonic + prost at build time, and the
//! credentials that go with every call ([`auth`]: bearer tokens, TLS).

pub mod auth;

/// Generated messages, client and server.
pub mod v1 {
    tonic::include_proto!("liandan.v1");

    /// Encoded descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("liandan_v1_descriptor");
}

/// Bumped on any incompatible change to the messages or their meaning; workers of another
/// version are refused at registration.
pub const PROTOCOL_VERSION: u32 = 4;
