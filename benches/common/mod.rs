//! What the benchmark and the load generator share (`examples/loadgen.rs` includes this
//! file with `#[path]`): the allocator and the shipped catalog's profile fields.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

// The same allocator as the `ringfence` binary, so numbers compare.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The fields of `user_profile` in the shipped field catalog (20 of them), loaded once.
pub fn profile_fields() -> &'static [String] {
    static FIELDS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FIELDS.get_or_init(|| {
        let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let snapshot = ringfence::policy::PolicySnapshot::load(&policies).unwrap();
        let record_type = ringfence::record::RecordType::new("user_profile").unwrap();
        let fields = snapshot.catalog().fields(&record_type).unwrap();
        fields.map(|field| field.as_str().to_owned()).collect()
    })
}
