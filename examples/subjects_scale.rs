//! The subject store at scale: creates N data subjects (default 1,000,000) through the
//! same path a first encryption takes, then reports the store's size on disk, the
//! latency of a cold lookup (read and unseal, no cache), a warm one (cached), of a
//! shred, and the time `keys rotate-master` takes to re-seal the store. Run:
//!
//!     cargo run --release --example subjects_scale -- [SUBJECTS] [DIR]
//!
//! DIR (default: a temporary directory) should be on the disk the server would use.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ringfence::keys::{Keyring, LocalMasterKey};
use ringfence::record::{Jurisdiction, SubjectId};
use ringfence::subjects::{Lookup, SUBJECTS_FILE, Subjects};

fn percentiles(mut samples: Vec<f64>) -> String {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    format!(
        "p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map_or(1_000_000, |n| n.parse().unwrap());
    let temporary = tempfile::tempdir().unwrap();
    let dir = args
        .next()
        .map_or_else(|| temporary.path().to_owned(), PathBuf::from);
    std::fs::create_dir_all(&dir).unwrap();
    let us = Jurisdiction::new("US").unwrap();
    let keyring = Arc::new(
        Keyring::create_unlogged(
            &dir.join("keyring.json"),
            &LocalMasterKey::generate().unwrap(),
            std::slice::from_ref(&us),
        )
        .unwrap(),
    );
    let subject = |n: usize| SubjectId::new(&format!("user-{n:09}")).unwrap();

    // Create: 256 concurrent first encryptions at a time, as a busy server would.
    let creating = Arc::new(Subjects::open(&dir, &keyring, 0).unwrap());
    let started = Instant::now();
    let tasks = 256;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (subjects, keyring, us) = (Arc::clone(&creating), Arc::clone(&keyring), us.clone());
        handles.push(tokio::spawn(async move {
            let mut n = task;
            while n < count {
                subjects
                    .for_encryption(&keyring, &us, &subject(n))
                    .await
                    .unwrap();
                n += tasks;
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(creating);
    println!(
        "created {count} subjects in {elapsed:.1} s ({:.0} subjects/s, batched commits)",
        count as f64 / elapsed
    );
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    let (db, wal) = (size(SUBJECTS_FILE), size(&format!("{SUBJECTS_FILE}-wal")));
    println!(
        "store on disk: {:.1} MB database + {:.1} MB WAL = {:.0} bytes per subject",
        db as f64 / 1e6,
        wal as f64 / 1e6,
        (db + wal) as f64 / count as f64
    );

    // Lookups at this size: cold (no cache: read from SQLite and unseal) and warm.
    let cold = Subjects::open(&dir, &keyring, 0).unwrap();
    let mut samples = Vec::new();
    for i in 0..2_000 {
        let n = (i * 7_919) % count;
        let started = Instant::now();
        let found = cold.lookup(&keyring, &us, &subject(n)).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        assert!(matches!(found, Lookup::Live(_)));
    }
    println!(
        "cold lookup (store read + unseal): {}",
        percentiles(samples)
    );
    drop(cold);
    let warm = Subjects::open(&dir, &keyring, 10_000).unwrap();
    warm.lookup(&keyring, &us, &subject(42)).await.unwrap();
    let mut samples = Vec::new();
    for _ in 0..2_000 {
        let started = Instant::now();
        warm.lookup(&keyring, &us, &subject(42)).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    println!("warm lookup (cached): {}", percentiles(samples));

    // Shreds: each durable (commit + WAL checkpoint) before it returns.
    let mut samples = Vec::new();
    for i in 0..100 {
        let n = (i * 104_729 + 13) % count;
        let started = Instant::now();
        warm.shred(&subject(n), std::slice::from_ref(&us))
            .await
            .unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6 / 1e3);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "shred (durable, checkpointed): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples[50], samples[98], samples[99]
    );
    drop(warm);

    // Re-sealing under a new master key (what `keys rotate-master` does to the store).
    let mut resealed = (*keyring).clone();
    resealed
        .reseal(&LocalMasterKey::generate().unwrap())
        .unwrap();
    let started = Instant::now();
    let count = ringfence::subjects::reseal_store(&dir, &keyring, &resealed)
        .unwrap()
        .unwrap();
    println!(
        "re-sealed {count} secrets under a new master key in {:.1} s (one transaction)",
        started.elapsed().as_secs_f64()
    );
}
