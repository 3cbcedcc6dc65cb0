//! Load generator: drives a ringfence server over gRPC with N concurrent clients and
//! prints records/s, latency percentiles and the server's CPU time per record.
//!
//! By default it starts `target/release/ringfence serve` itself (a temporary data
//! directory, the shipped policies, development identity headers) so the server's CPU
//! time can be read from /proc. Run it with:
//!
//!     cargo run --release --example loadgen -- --clients 8 --seconds 10
//!
//! Options: `--clients N`, `--seconds S`, `--records R` (distinct records cycled),
//! `--fresh-tickets` (a new ticket per request, so no decision is served from the
//! cache), `--stream` (use DecryptRecords, one stream per client), `--data-dir DIR`
//! (where the spawned server keeps its log; put it on tmpfs to take fsync out),
//! `--call encrypt` (EncryptRecord as us-signup, the record built anew per request)
//! or `--call status` (GetStatus: the gRPC floor) instead of DecryptRecord,
//! `--cold` (a new data subject and ticket per request: with `--call decrypt`, every
//! request opens another subject's record, each encrypted at setup, and names a new
//! ticket, its secret read from the subject store: the spawned server's subject cache
//! is off; with `--call encrypt`, every request is a new subject's record),
//! `--addr HOST:PORT` (drive an already running server; no CPU figure then),
//! `--in-process` (no gRPC: N tasks call the gatekeeper directly; the CPU figure is
//! then decide + log + decrypt alone), `--mtls` (serve with `--dev`: mutual TLS with
//! client certificates and employee tokens, as deployed, instead of plain TCP with
//! identity headers), `--write-bodies DIR` (with `--addr`: encrypt one record and write
//! gRPC-framed request bodies for h2load, see `benches/load.sh`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::zombie_processes
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringfence::pb;
use ringfence::pb::ringfence_client::RingfenceClient;
use tonic::transport::Channel;

#[path = "../benches/common/mod.rs"]
mod common;

use common::profile_fields;

struct Options {
    clients: usize,
    seconds: u64,
    records: usize,
    fresh_tickets: bool,
    stream: bool,
    data_dir: Option<PathBuf>,
    addr: Option<String>,
    in_process: bool,
    mtls: bool,
    write_bodies: Option<PathBuf>,
    call: Call,
    cold: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Call {
    Decrypt,
    Encrypt,
    Status,
}

/// With `--mtls`: the development PKI of the spawned server and alice's token.
static MTLS: std::sync::OnceLock<(ringfence::dev::DevPki, String)> = std::sync::OnceLock::new();

/// A channel to `addr` as `service`: plain, or mutual TLS with its client certificate.
async fn channel(addr: &str, service: &str) -> Channel {
    match MTLS.get() {
        None => Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        Some((pki, _)) => {
            let read = |path: PathBuf| std::fs::read(path).unwrap();
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(pki.ca_cert())))
                .identity(tonic::transport::Identity::from_pem(
                    read(pki.client_cert(service)),
                    read(pki.client_key(service)),
                ))
                .domain_name("localhost");
            Channel::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap()
        }
    }
}

fn options() -> Options {
    let mut options = Options {
        clients: 8,
        seconds: 10,
        records: 200,
        fresh_tickets: false,
        stream: false,
        data_dir: None,
        addr: None,
        in_process: false,
        mtls: false,
        write_bodies: None,
        call: Call::Decrypt,
        cold: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--clients" => options.clients = value().parse().unwrap(),
            "--seconds" => options.seconds = value().parse().unwrap(),
            "--records" => options.records = value().parse().unwrap(),
            "--fresh-tickets" => options.fresh_tickets = true,
            "--stream" => options.stream = true,
            "--data-dir" => options.data_dir = Some(PathBuf::from(value())),
            "--addr" => options.addr = Some(value()),
            "--in-process" => options.in_process = true,
            "--mtls" => options.mtls = true,
            "--write-bodies" => options.write_bodies = Some(PathBuf::from(value())),
            "--call" => {
                options.call = match value().as_str() {
                    "decrypt" => Call::Decrypt,
                    "encrypt" => Call::Encrypt,
                    "status" => Call::Status,
                    other => panic!("--call {other}: decrypt, encrypt or status"),
                }
            }
            "--cold" => options.cold = true,
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        !(options.stream || options.in_process) || (options.call == Call::Decrypt && !options.cold),
        "--call and --cold apply to unary calls over gRPC, not to --stream or --in-process"
    );
    options
}

/// The server binary next to this example's directory (target/release/ringfence).
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = dir.join("ringfence");
    assert!(
        binary.exists(),
        "{} not found: run `cargo build --release` first",
        binary.display()
    );
    binary
}

fn spawn_server(data_dir: &Path, mtls: bool, cold: bool) -> (Child, String) {
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    if !mtls {
        // Outside --dev the server creates no keys: make them (a no-op when present).
        let status = Command::new(server_binary())
            .args([
                "keys",
                "init",
                "--danger-allow-development-master-key",
                "--data-dir",
            ])
            .arg(data_dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "keys init failed");
    }
    let mut child = Command::new(server_binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--shutdown-drain-secs",
            "0",
        ])
        .args(if mtls {
            &["--dev"][..]
        } else {
            &[
                "--danger-trust-identity-headers",
                "--danger-allow-development-master-key",
            ][..]
        })
        .arg("--policies")
        .arg(policies)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RINGFENCE_LOG", "warn,ringfence::server=info")
        // Cold: every subject's secret is read from the subject store, none from the
        // server's cache (which setup's encryptions would fill).
        .envs(cold.then_some(("RINGFENCE_SUBJECT_CACHE", "0")))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        let line = line.unwrap();
        if let Some(at) = line.find("address=") {
            let address = line[at + "address=".len()..].trim().to_owned();
            return (child, address);
        }
    }
    panic!("server exited before listening");
}

/// utime + stime of a process, from /proc/PID/stat, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of proc(5), counted from the state field (3).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = 100.0; // USER_HZ on Linux
    ticks as f64 / hz
}

/// A request as `employee` via `service`: identity headers, or with `--mtls` alice's
/// token (the service is the channel's certificate).
fn caller<T>(message: T, service: &str, employee: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    match (MTLS.get(), employee) {
        (Some((_, token)), Some(_)) => {
            metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        (Some(_), None) => {}
        (None, employee) => {
            metadata.insert("x-ringfence-service", service.parse().unwrap());
            if let Some(employee) = employee {
                metadata.insert("x-ringfence-employee", employee.parse().unwrap());
            }
        }
    }
    request
}

/// The 20-field profile of record `user-{n}`, its own data subject.
fn encrypt_request(n: usize) -> pb::EncryptRecordRequest {
    pb::EncryptRecordRequest {
        subject_id: String::new(),
        record_type: "user_profile".to_owned(),
        record_id: format!("user-{n:08}"),
        jurisdiction: "US".to_owned(),
        fields: profile_fields()
            .iter()
            .map(|field| pb::PlainField {
                name: (*field).to_owned(),
                value: format!("{field} of user {n}: some realistic length value").into_bytes(),
            })
            .collect(),
    }
}

/// Encrypts records `user-0` .. `user-{count - 1}` (8 at a time).
async fn setup(channel: Channel, count: usize) -> Vec<pb::EncryptedRecord> {
    let workers = 8;
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let mut client = RingfenceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut records = Vec::new();
            for n in (worker..count).step_by(workers) {
                let request = caller(encrypt_request(n), "us-signup", None);
                let record = client.encrypt_record(request).await.unwrap().into_inner();
                records.push((n, record.record.unwrap()));
            }
            records
        }));
    }
    let mut records = Vec::with_capacity(count);
    for task in tasks {
        records.extend(task.await.unwrap());
    }
    records.sort_by_key(|(n, _)| *n);
    records.into_iter().map(|(_, record)| record).collect()
}

fn decrypt_request(record: &pb::EncryptedRecord, ticket: String) -> pb::DecryptRecordRequest {
    pb::DecryptRecordRequest {
        record: Some(record.clone()),
        fields: Vec::new(),
        purpose: "support".to_owned(),
        ticket,
    }
}

fn check(response: &pb::DecryptRecordResponse) {
    assert_eq!(response.fields.len(), profile_fields().len());
    let plaintexts = response
        .fields
        .iter()
        .filter(|f| matches!(f.outcome, Some(pb::field_outcome::Outcome::Plaintext(_))))
        .count();
    // alice may read 5 public + 6 pii + 5 sensitive fields; 4 restricted are denied.
    assert_eq!(plaintexts, 16, "unexpected decisions");
}

/// Drives the gatekeeper directly: the same work as a request minus gRPC.
async fn in_process(options: &Options, data_dir: &Path) {
    use ringfence::gatekeeper::{DecryptRequest, PlainRecord, RecordRef};
    use ringfence::identity::Caller;
    use ringfence::record::{FieldName, Jurisdiction, RecordId, RecordType, StatedPurpose};

    let mut config = ringfence::ServeConfig::defaults();
    config.data_dir = data_dir.to_owned();
    config.allow_development_master_key = true;
    config.create_missing_keys = true;
    config.policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let gate = ringfence::server::prepare(&config).await.unwrap();
    let signup = Caller {
        service: "us-signup".to_owned(),
        employee: None,
        method: "loadgen",
        lease: None,
        certificate: None,
    };
    let mut records = Vec::new();
    for n in 0..options.records {
        let plain = PlainRecord {
            subject: None,
            record: RecordRef {
                record_type: RecordType::new("user_profile").unwrap(),
                record_id: RecordId::new(&format!("user-{n:08}")).unwrap(),
                jurisdiction: Jurisdiction::new("US").unwrap(),
            },
            fields: profile_fields()
                .iter()
                .map(|f| {
                    let value =
                        format!("{f} of user {n}: some realistic length value").into_bytes();
                    (FieldName::new(f).unwrap(), zeroize::Zeroizing::new(value))
                })
                .collect(),
        };
        records.push(gate.encrypt_record(&signup, plain).await.unwrap().record);
    }
    let records = Arc::new(records);
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..options.clients {
        let (gate, records, done) = (Arc::clone(&gate), Arc::clone(&records), Arc::clone(&done));
        let fresh = options.fresh_tickets;
        tasks.push(tokio::spawn(async move {
            let alice = Caller {
                service: "us-support-tool".to_owned(),
                employee: Some("alice".to_owned()),
                method: "loadgen",
                lease: None,
                certificate: None,
            };
            let mut next = client_index;
            while Instant::now() < deadline {
                let ticket = if fresh {
                    format!("INC-{next}")
                } else {
                    "INC-1".to_owned()
                };
                let request = DecryptRequest {
                    record: records[next % records.len()].clone(),
                    wanted: Vec::new(),
                    stated: StatedPurpose::new("support", &ticket).unwrap(),
                };
                next += 1;
                let decrypted = gate.decrypt_record(&alice, request).await.unwrap();
                assert_eq!(decrypted.fields.len(), profile_fields().len());
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id()) - cpu_before;
    let count = done.load(Ordering::Relaxed);
    println!(
        "mode=in-process (no gRPC) tasks={} seconds={elapsed:.1} fresh_tickets={}",
        options.clients, options.fresh_tickets
    );
    println!(
        "records decided+logged+decrypted: {count} ({:.0} records/s)",
        count as f64 / elapsed
    );
    println!(
        "process CPU: {cpu:.2} s total, {:.1} us per record (decide + log + decrypt)",
        cpu * 1e6 / count.max(1) as f64
    );
}

/// Records in one `stream.bin` body.
const STREAM_BODY_RECORDS: usize = 256;

/// Writes gRPC-framed request bodies for an outside load generator (h2load, see
/// `benches/load.sh`): `decrypt.bin` (alice's DecryptRecord of the first record,
/// purpose support, ticket INC-1), `stream.bin` (a DecryptRecords stream of that
/// request, [`STREAM_BODY_RECORDS`] times), `encrypt.bin` (us-signup's EncryptRecord
/// of the first record's profile) and `status.bin` (GetStatus, the floor).
fn write_bodies(dir: &Path, record: &pb::EncryptedRecord) {
    fn framed(message: &impl prost::Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
    std::fs::create_dir_all(dir).unwrap();
    let decrypt = framed(&decrypt_request(record, "INC-1".to_owned()));
    std::fs::write(dir.join("decrypt.bin"), &decrypt).unwrap();
    std::fs::write(dir.join("stream.bin"), decrypt.repeat(STREAM_BODY_RECORDS)).unwrap();
    std::fs::write(dir.join("encrypt.bin"), framed(&encrypt_request(0))).unwrap();
    std::fs::write(dir.join("status.bin"), framed(&pb::GetStatusRequest {})).unwrap();
}

#[tokio::main]
async fn main() {
    let options = options();
    let temporary = tempfile::tempdir().unwrap();
    let data_dir = options
        .data_dir
        .clone()
        .unwrap_or_else(|| temporary.path().join("data"));
    if options.in_process {
        in_process(&options, &data_dir).await;
        return;
    }
    let (child, addr) = match &options.addr {
        Some(addr) => (None, addr.clone()),
        None => {
            let (child, addr) = spawn_server(&data_dir, options.mtls, options.cold);
            if options.mtls {
                let pki = ringfence::dev::DevPki::of(&data_dir);
                let token = pki
                    .token_signer()
                    .unwrap()
                    .mint("alice", "us-support-tool", time::Duration::hours(1))
                    .unwrap();
                let _ = MTLS.set((pki, token));
            }
            (Some(child), addr)
        }
    };
    let setup_channel = channel(&addr, "us-signup").await;
    let records = Arc::new(setup(setup_channel, options.records).await);
    if let Some(dir) = &options.write_bodies {
        write_bodies(dir, &records[0]);
        return;
    }

    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let done = Arc::new(AtomicU64::new(0));
    let tickets = Arc::new(AtomicU64::new(0));
    // With `--cold`: the next subject (a record encrypted at setup, or a new one).
    let subjects = Arc::new(AtomicU64::new(0));
    let cpu_before = child.as_ref().map(|c| cpu_seconds(c.id()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..options.clients {
        let channel = channel(&addr, "us-support-tool").await;
        let records = Arc::clone(&records);
        let done = Arc::clone(&done);
        let tickets = Arc::clone(&tickets);
        let subjects = Arc::clone(&subjects);
        let fresh = options.fresh_tickets || options.cold;
        let stream = options.stream;
        let (call, cold) = (options.call, options.cold);
        tasks.push(tokio::spawn(async move {
            let mut client = RingfenceClient::new(channel);
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut next = client_index;
            let ticket = move |tickets: &AtomicU64| {
                if fresh {
                    format!("INC-{}", tickets.fetch_add(1, Ordering::Relaxed))
                } else {
                    "INC-1".to_owned()
                }
            };
            if stream {
                // One bulk stream per client; the latency is per answered record.
                let (sender, receiver) = tokio::sync::mpsc::channel(64);
                let feeder_records = Arc::clone(&records);
                let feeder_tickets = Arc::clone(&tickets);
                tokio::spawn(async move {
                    let mut n = client_index;
                    while Instant::now() < deadline {
                        let record = &feeder_records[n % feeder_records.len()];
                        n += 1;
                        if sender
                            .send(decrypt_request(record, ticket(&feeder_tickets)))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                let mut answers = client
                    .decrypt_records(caller(
                        tokio_stream::wrappers::ReceiverStream::new(receiver),
                        "us-support-tool",
                        Some("alice"),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let mut last = Instant::now();
                while let Some(answer) = answers.message().await.unwrap() {
                    check(&answer);
                    let now = Instant::now();
                    histogram
                        .record(now.duration_since(last).as_micros().max(1) as u64)
                        .unwrap();
                    last = now;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                while Instant::now() < deadline {
                    let begin = Instant::now();
                    match call {
                        Call::Decrypt => {
                            let index = if cold {
                                let n = subjects.fetch_add(1, Ordering::Relaxed) as usize;
                                if n >= records.len() {
                                    break; // every subject opened once
                                }
                                n
                            } else {
                                next += 1;
                                (next - 1) % records.len()
                            };
                            let request = caller(
                                decrypt_request(&records[index], ticket(&tickets)),
                                "us-support-tool",
                                Some("alice"),
                            );
                            check(&client.decrypt_record(request).await.unwrap().into_inner());
                        }
                        Call::Encrypt => {
                            // Cold: a record of its own subject, never seen before.
                            let n = if cold {
                                1_000_000_000 + subjects.fetch_add(1, Ordering::Relaxed) as usize
                            } else {
                                0
                            };
                            let request = caller(encrypt_request(n), "us-signup", None);
                            let answer = client.encrypt_record(request).await.unwrap();
                            let record = answer.into_inner().record.unwrap();
                            assert_eq!(record.fields.len(), profile_fields().len());
                        }
                        Call::Status => {
                            let request =
                                caller(pb::GetStatusRequest {}, "us-support-tool", Some("alice"));
                            client.get_status(request).await.unwrap();
                        }
                    }
                    histogram
                        .record(begin.elapsed().as_micros().max(1) as u64)
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            histogram
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for task in tasks {
        histogram.add(task.await.unwrap()).unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let records_done = done.load(Ordering::Relaxed);
    println!(
        "mode={} clients={} seconds={:.1} fresh_tickets={} cold={} fields_per_record=20",
        match (options.stream, options.call) {
            (true, _) => "DecryptRecords stream",
            (false, Call::Decrypt) => "DecryptRecord unary",
            (false, Call::Encrypt) => "EncryptRecord unary",
            (false, Call::Status) => "GetStatus unary (the floor)",
        },
        options.clients,
        elapsed,
        options.fresh_tickets || options.cold,
        options.cold
    );
    if options.cold && options.call == Call::Decrypt && records_done as usize >= records.len() {
        println!(
            "every one of the {} records was opened before the time was up: pass more --records",
            records.len()
        );
    }
    println!(
        "requests answered: {records_done} ({:.0} records/s)",
        records_done as f64 / elapsed
    );
    println!(
        "latency per request: p50 {} us, p90 {} us, p99 {} us, max {} us",
        histogram.value_at_quantile(0.50),
        histogram.value_at_quantile(0.90),
        histogram.value_at_quantile(0.99),
        histogram.max()
    );
    if let (Some(child), Some(before)) = (&child, cpu_before) {
        let cpu = cpu_seconds(child.id()) - before;
        println!(
            "server CPU: {:.2} s total, {:.1} us per request (includes gRPC/HTTP2, decisions, log, decryption)",
            cpu,
            cpu * 1e6 / records_done.max(1) as f64
        );
    }
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}
