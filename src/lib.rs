//! ringfence: a gRPC data gatekeeper.
//!
//! Records are encrypted field by field under keys scoped to their jurisdiction; a field
//! is decrypted only when a Cedar policy permits the authenticated caller, and only after
//! the decision has been durably appended to a hash-chained decision log.
//!
//! The modules mirror the data flow (see `docs/architecture.md`, one row per module):
//! [`identity`] (with [`identity::tls`] and [`identity::token`]) -> [`service`] (proto
//! <-> domain) -> [`gatekeeper`] which asks [`policy`], appends to [`audit`], and uses
//! [`keys`] and [`crypto`]. The public surface is what the binary, the fuzz targets,
//! the benchmarks and the examples use ("The public surface" in that document);
//! everything else is private to its module.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod failures;
pub mod fsutil;
pub mod gatekeeper;
pub mod identity;
pub mod keyadmin;
pub mod keyfile;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod preflight;
pub mod record;
pub mod reload;
pub mod server;
pub mod service;
pub mod subjects;

/// Generated protobuf and gRPC code for `ringfence.v1`; never edited by hand.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
    tonic::include_proto!("ringfence.v1");

    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("ringfence_descriptor");

    // Messages that carry plaintext never print it (see build.rs `skip_debug`).
    impl std::fmt::Debug for PlainField {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PlainField")
                .field("name", &self.name)
                .field(
                    "value",
                    &format_args!("<{} bytes redacted>", self.value.len()),
                )
                .finish()
        }
    }

    impl std::fmt::Debug for FieldOutcome {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FieldOutcome")
                .field("name", &self.name)
                .field("outcome", &self.outcome)
                .finish()
        }
    }

    impl std::fmt::Debug for field_outcome::Outcome {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::Plaintext(bytes) => write!(f, "Plaintext(<{} bytes redacted>)", bytes.len()),
                Self::Denied(denied) => f.debug_tuple("Denied").field(denied).finish(),
                Self::Error(error) => f.debug_tuple("Error").field(error).finish(),
            }
        }
    }
}

pub use config::ServeConfig;
pub use gatekeeper::Gatekeeper;
pub use record::{FieldName, Jurisdiction, KeyVersion, RecordId, RecordType};

#[cfg(test)]
mod tests {
    #[test]
    fn plaintext_carrying_messages_never_print_it() {
        let field = crate::pb::PlainField {
            name: "email".to_owned(),
            value: b"SECRET-VALUE".to_vec(),
        };
        let outcome = crate::pb::FieldOutcome {
            name: "email".to_owned(),
            outcome: Some(crate::pb::field_outcome::Outcome::Plaintext(
                b"SECRET-VALUE".to_vec(),
            )),
        };
        let domain = crate::gatekeeper::Outcome::Plaintext(zeroize::Zeroizing::new(
            b"SECRET-VALUE".to_vec(),
        ));
        let printed = format!("{field:?} {outcome:?} {domain:?}");
        assert!(!printed.contains("SECRET"), "{printed}");
        assert!(printed.contains("12 bytes redacted"), "{printed}");
    }
}
