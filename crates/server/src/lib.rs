//! The public gRPC API (`afnext.v1.AfNext`) over one [`afnext_engine::Engine`], with `grpc.health.v1`,
//! server reflection, an upload store for large audio, and graceful shutdown.
//!
//! * [`status`] is the one place where engine errors become gRPC status codes.
//! * [`convert`] turns protobuf requests into engine requests (and checks them).
//! * [`service`] implements the RPCs; [`serve`] runs them on a listener until a shutdown signal.

pub mod config;
pub mod convert;
pub mod decoder_svc;
pub mod encoder_svc;
pub mod links;
pub mod metrics;
pub mod prom;
pub mod service;
pub mod status;
pub mod tls;
pub mod uploads;
pub mod wire;

/// Generated messages, server and client of `afnext.v1`.
pub mod pb {
    tonic::include_proto!("afnext.v1");
    /// The encoded descriptor set of `afnext.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("afnext_v1_descriptor");
}

/// The internal API between cluster tiers (`proto/afnext/cluster/v1/cluster.proto`).
pub mod cluster_pb {
    include!(concat!(env!("OUT_DIR"), "/cluster/afnext.cluster.v1.rs"));
}

pub use config::ServerConfig;
pub use service::{serve, ServeOutcome};
