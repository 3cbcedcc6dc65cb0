//! ringfence: a gRPC data gatekeeper.
//!
//! Records are encrypted field by field under keys scoped to their jurisdiction; a field
//! is decrypted only when a Cedar policy permits the authenticated caller, and only after
//! the decision has been durably appended to a hash-chained decision log.
//!
//! The modules mirror the data flow (see `docs/architecture.md`):
//! [`identity`] -> [`service`] (proto <-> domain) -> [`gatekeeper`] which asks [`policy`],
//! appends to [`audit`], and uses [`keys`] and [`crypto`].
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod crypto;
pub mod gatekeeper;
pub mod identity;
pub mod keys;
pub mod policy;
pub mod record;
pub mod server;
pub mod service;

/// Generated protobuf and gRPC code for `ringfence.v1`; never edited by hand.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
    tonic::include_proto!("ringfence.v1");

    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("ringfence_descriptor");
}

pub use config::ServeConfig;
pub use gatekeeper::Gatekeeper;
pub use record::{FieldName, Jurisdiction, KeyVersion, RecordId, RecordType};
