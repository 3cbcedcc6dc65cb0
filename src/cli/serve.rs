//! `ringfence serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use ringfence::config::{
    Auth, DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_STREAMS_PER_CALLER,
    DEFAULT_POLICIES, DEFAULT_STREAM_SEND_TIMEOUT, ServeConfig, StreamLimits,
};
use ringfence::gatekeeper::Limits;
use ringfence::identity::tls::TlsFiles;
use ringfence::identity::token::TokenConfig;
use ringfence::keys::{MASTER_KEY_ENV, MasterKeyText};
use ringfence::policy::prove::ProveOptions;
use ringfence::policy::{ProofGuard, ProofMode};
use ringfence::record::Jurisdiction;
use ringfence::server::{self, Error};

use super::{DataDir, EXIT_FAILURE, EXIT_INVALID_POLICIES, fail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A TOML file whose keys are these flags without the dashes (`listen =
    /// "0.0.0.0:50051"`, `jurisdictions = ["US"]`, `dev = true`); flags and
    /// `RINGFENCE_*` environment variables win over it. Check one with `ringfence
    /// config check FILE`.
    #[arg(long, env = "RINGFENCE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (non-loopback addresses need mutual TLS).
    #[arg(long, env = "RINGFENCE_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    #[command(flatten)]
    data: DataDir,
    /// Policy directory: schema, policies, directory, field catalog.
    #[arg(long, env = "RINGFENCE_POLICIES", default_value = DEFAULT_POLICIES)]
    policies: PathBuf,
    /// Jurisdictions that accept new encryptions, comma-separated; each must hold keys
    /// (`ringfence keys init`), except with --dev, which creates them.
    #[arg(
        long,
        env = "RINGFENCE_JURISDICTIONS",
        value_delimiter = ',',
        default_value = "US,SG,EU"
    )]
    jurisdictions: Vec<Jurisdiction>,
    /// File holding the master key (64 hex digits or base64 of 32 bytes).
    /// Without it, the RINGFENCE_MASTER_KEY environment variable is used.
    #[arg(long, env = "RINGFENCE_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// DEVELOPMENT ONLY: accept the development master key stored in the data
    /// directory (implied by --dev, which also creates it and the keys).
    #[arg(long, env = "RINGFENCE_DANGER_ALLOW_DEVELOPMENT_MASTER_KEY")]
    danger_allow_development_master_key: bool,
    /// Development: mutual TLS and employee tokens from a local CA and identity provider
    /// in <data-dir>/dev-pki (created on first start, see `ringfence dev init`), and a
    /// development master key and keyring created on first start. Refused off loopback.
    #[arg(long, env = "RINGFENCE_DEV", conflicts_with_all = ["danger_trust_identity_headers", "tls_cert"])]
    dev: bool,
    /// DEVELOPMENT ONLY: believe the x-ringfence-service and x-ringfence-employee
    /// metadata headers as the caller's identity, over plain TCP. Refused off loopback.
    #[arg(
        long,
        env = "RINGFENCE_DANGER_TRUST_IDENTITY_HEADERS",
        conflicts_with = "tls_cert"
    )]
    danger_trust_identity_headers: bool,
    /// Server certificate chain (PEM) for mutual TLS.
    #[arg(long, env = "RINGFENCE_TLS_CERT", requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "RINGFENCE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that client certificates must chain to.
    #[arg(long, env = "RINGFENCE_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM, or one DER list) of the client CAs, reloaded
    /// on change and on SIGHUP; open connections are checked again at their next
    /// request or streamed record. Every CA of a client chain needs its list here: a
    /// certificate whose issuer has none is refused. A reload that would take a
    /// revocation back (a list missing or older than the one in use) is rejected.
    #[arg(long, env = "RINGFENCE_CLIENT_CRL", requires = "client_ca")]
    client_crl: Option<PathBuf>,
    /// Trust domain of client certificates: a service is named by the URI SAN
    /// spiffe://<trust-domain>/svc/<service> or the DNS SAN <service>.svc.<trust-domain>.
    #[arg(
        long,
        env = "RINGFENCE_TRUST_DOMAIN",
        default_value = "ringfence.local",
        requires = "tls_cert"
    )]
    trust_domain: String,
    /// JWKS file of the identity provider that signs employee tokens (reloaded on
    /// change and on SIGHUP). Without it, calls carrying a token are refused.
    #[arg(long, env = "RINGFENCE_JWKS", requires_all = ["tls_cert", "token_issuer", "token_audience"])]
    jwks: Option<PathBuf>,
    /// Required `iss` of employee tokens.
    #[arg(long, env = "RINGFENCE_TOKEN_ISSUER", requires = "jwks")]
    token_issuer: Option<String>,
    /// Required `aud` of employee tokens.
    #[arg(long, env = "RINGFENCE_TOKEN_AUDIENCE", requires = "jwks")]
    token_audience: Option<String>,
    /// Accept employee tokens bound to no service (neither `cnf.x5t#S256` nor `azp`):
    /// any service holding one could then act for its employee. Each such call is
    /// logged with authentication `mtls+unbound-token`.
    #[arg(
        long,
        env = "RINGFENCE_DANGER_ACCEPT_UNBOUND_TOKENS",
        requires = "jwks"
    )]
    danger_accept_unbound_tokens: bool,
    /// Allowed clock skew for token expiry and not-before, in seconds (at most 300).
    #[arg(long, env = "RINGFENCE_TOKEN_LEEWAY_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=300))]
    token_leeway_secs: u64,
    /// Largest gRPC message accepted or sent, in bytes; a larger request is
    /// OUT_OF_RANGE, and so is a larger answer, which is not sent (its decisions are
    /// logged as undelivered).
    #[arg(long, env = "RINGFENCE_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Most fields in one record (and in one request's field list); more are
    /// INVALID_ARGUMENT.
    #[arg(long, env = "RINGFENCE_MAX_FIELDS_PER_RECORD", default_value_t = Limits::default().max_fields as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_fields_per_record: u64,
    /// Largest plaintext of one field that EncryptRecord accepts, in bytes; larger is
    /// INVALID_ARGUMENT. At most --max-message-bytes. Default: 1 MiB, or
    /// --max-message-bytes when that is smaller.
    #[arg(long, env = "RINGFENCE_MAX_FIELD_BYTES", value_parser = clap::value_parser!(u64).range(1..=(1 << 32)))]
    max_field_bytes: Option<u64>,
    /// `DecryptRecords` streams one caller (service and employee) may have open at
    /// once; more are refused with RESOURCE_EXHAUSTED. At most 128: each open stream
    /// may hold a record of its caller's pool of 256.
    #[arg(long, env = "RINGFENCE_MAX_STREAMS_PER_CALLER", default_value_t = DEFAULT_MAX_STREAMS_PER_CALLER as u64, value_parser = clap::value_parser!(u64).range(1..=128))]
    max_streams_per_caller: u64,
    /// Seconds the server waits for a client to take a streamed answer; a stream that
    /// stalls longer ends with DEADLINE_EXCEEDED and its answers are logged as
    /// undelivered.
    #[arg(long, env = "RINGFENCE_STREAM_SEND_TIMEOUT_SECS", default_value_t = DEFAULT_STREAM_SEND_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    stream_send_timeout_secs: u64,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`, OpenMetrics text),
    /// or `off`. No TLS and no authentication: keep it on loopback or a monitoring
    /// network.
    #[arg(long, env = "RINGFENCE_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN, value_parser = parse_metrics_listen)]
    metrics_listen: MetricsListen,
    /// Seconds the server keeps serving after SIGTERM while its health service says
    /// NOT_SERVING, so that load balancers move away before it stops accepting; then
    /// running calls finish (streams end with UNAVAILABLE), the decision log is
    /// signed and the process exits 0. A second signal, or SIGINT, skips the drain.
    #[arg(long, env = "RINGFENCE_SHUTDOWN_DRAIN_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_drain_secs: u64,
    /// Export request spans (each carrying its decision log request id) over OTLP/gRPC
    /// to this collector, e.g. http://127.0.0.1:4317. Needs a build with the `otlp`
    /// feature.
    #[arg(long, env = "RINGFENCE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Do not reload policies when files in the policy directory change (SIGHUP still
    /// reloads; the JWKS and revocation lists are still watched).
    #[arg(long, env = "RINGFENCE_NO_WATCH_POLICIES")]
    no_watch_policies: bool,
    /// Decision log checkpoint signing key (PKCS#8 PEM Ed25519), created if missing.
    /// Default: audit-signing-key.pem in the data directory.
    #[arg(long, env = "RINGFENCE_CHECKPOINT_KEY")]
    checkpoint_key: Option<PathBuf>,
    /// Start a new decision log segment after this many MiB.
    #[arg(long, env = "RINGFENCE_LOG_SEGMENT_MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    log_segment_mib: u64,
    /// Start a new decision log segment after this many hours.
    #[arg(long, env = "RINGFENCE_LOG_SEGMENT_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
    log_segment_hours: u64,
    /// Unsealed data-subject secrets kept in memory (about 200 bytes each); 0 reads
    /// the subject store on every request.
    #[arg(long, env = "RINGFENCE_SUBJECT_CACHE", default_value_t = ringfence::subjects::DEFAULT_CACHE_ENTRIES as u64, value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    subject_cache: u64,
    /// What to do with a policy set whose invariants (policies/invariants/) do not
    /// prove: `enforce` refuses it at start and on reload (also when the solver is
    /// missing, times out or answers unknown, and when an invariant is weakened or
    /// deleted without an acknowledgement in CHANGES.yaml); `warn` serves it and logs
    /// why; `off` does not prove. Default: enforce; warn with --dev.
    #[arg(long, env = "RINGFENCE_PROVE", value_enum)]
    prove: Option<ProveArg>,
    /// The cvc5 binary for proofs (default: $CVC5, else `cvc5` on PATH).
    #[arg(long, env = "RINGFENCE_PROVE_SOLVER")]
    prove_solver: Option<PathBuf>,
    /// Longest one solver query may take, in seconds; then it answers unknown.
    #[arg(long, env = "RINGFENCE_PROVE_QUERY_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    prove_query_timeout: u64,
}

/// Default of `--metrics-listen`: loopback, the port OpenTelemetry's Prometheus
/// exporters use.
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct MetricsListen(Option<SocketAddr>);

fn parse_metrics_listen(value: &str) -> Result<MetricsListen, String> {
    if value == "off" {
        return Ok(MetricsListen(None));
    }
    value
        .parse()
        .map(|address| MetricsListen(Some(address)))
        .map_err(|_| format!("`{value}` is not an address such as 127.0.0.1:9464, nor `off`"))
}

/// `--prove`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProveArg {
    /// Refuse a set that does not prove.
    Enforce,
    /// Serve it and log why.
    Warn,
    /// Do not prove.
    Off,
}

fn auth(args: &Args) -> Auth {
    if args.dev {
        return Auth::Dev;
    }
    if args.danger_trust_identity_headers {
        return Auth::DangerTrustIdentityHeaders;
    }
    match (&args.tls_cert, &args.tls_key, &args.client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => Auth::Mtls {
            tls: TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
                client_crl: args.client_crl.clone(),
            },
            trust_domain: args.trust_domain.clone(),
            tokens: match (&args.jwks, &args.token_issuer, &args.token_audience) {
                (Some(jwks), Some(issuer), Some(audience)) => Some(TokenConfig {
                    jwks: jwks.clone(),
                    issuer: issuer.clone(),
                    audience: audience.clone(),
                    leeway: std::time::Duration::from_secs(args.token_leeway_secs),
                    accept_unbound: args.danger_accept_unbound_tokens,
                }),
                _ => None,
            },
        },
        _ => Auth::None,
    }
}

impl Args {
    /// `--otlp-endpoint`, when given.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref()
    }
}

/// The configuration `args` describe (flags, environment, configuration file).
pub fn config(args: Args) -> ServeConfig {
    let auth = auth(&args);
    ServeConfig {
        listen: args.listen,
        data_dir: args.data.data_dir,
        policies: args.policies,
        jurisdictions: args.jurisdictions,
        master_key_file: args.master_key_file,
        master_key_env: std::env::var(MASTER_KEY_ENV).ok().map(MasterKeyText::new),
        allow_development_master_key: args.dev || args.danger_allow_development_master_key,
        create_missing_keys: args.dev,
        auth,
        max_message_bytes: args.max_message_bytes,
        limits: Limits {
            max_fields: usize::try_from(args.max_fields_per_record).unwrap_or(usize::MAX),
            max_field_bytes: match args.max_field_bytes {
                Some(bytes) => usize::try_from(bytes).unwrap_or(usize::MAX),
                None => Limits::default()
                    .max_field_bytes
                    .min(args.max_message_bytes),
            },
        },
        streams: StreamLimits {
            max_per_caller: usize::try_from(args.max_streams_per_caller).unwrap_or(usize::MAX),
            send_timeout: std::time::Duration::from_secs(args.stream_send_timeout_secs),
        },
        watch_policies: !args.no_watch_policies,
        checkpoint_key: args.checkpoint_key,
        log_segment_bytes: args.log_segment_mib * 1024 * 1024,
        log_segment_age: std::time::Duration::from_secs(args.log_segment_hours * 3600),
        subject_cache_entries: usize::try_from(args.subject_cache).unwrap_or(usize::MAX),
        metrics_listen: args.metrics_listen.0,
        shutdown_drain: std::time::Duration::from_secs(args.shutdown_drain_secs),
        proof: ProofGuard {
            mode: match (args.prove, args.dev) {
                (Some(ProveArg::Enforce), _) | (None, false) => ProofMode::Enforce,
                // The quick start needs only the Rust toolchain.
                (Some(ProveArg::Warn), _) | (None, true) => ProofMode::Warn,
                (Some(ProveArg::Off), _) => ProofMode::Off,
            },
            options: ProveOptions {
                solver: args
                    .prove_solver
                    .clone()
                    .unwrap_or_else(|| ProveOptions::default().solver),
                query_timeout: std::time::Duration::from_secs(args.prove_query_timeout),
                total_timeout: std::time::Duration::from_secs(600),
            },
        },
    }
}

pub fn run(args: Args, telemetry: &super::telemetry::Telemetry) -> ExitCode {
    let otlp_endpoint = args.otlp_endpoint.clone();
    let config = config(args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(EXIT_FAILURE, format!("cannot start runtime: {error}")),
    };
    let drain = config.shutdown_drain;
    runtime.block_on(async move {
        let mut signals = Signals::install();
        let exporting = match otlp_endpoint
            .as_deref()
            .map(|endpoint| telemetry.export_to(endpoint))
        {
            None => None,
            Some(Ok(exporting)) => Some(exporting),
            Some(Err(error)) => return fail(EXIT_FAILURE, error),
        };
        let code = serve(config, drain, &mut signals).await;
        if let Some(exporting) = exporting {
            // Blocking: the exporter flushes on this thread.
            tokio::task::block_in_place(|| exporting.shutdown());
        }
        code
    })
}

/// Serves `config` until a signal, with the drain on SIGTERM.
async fn serve(config: ServeConfig, drain: std::time::Duration, signals: &mut Signals) -> ExitCode {
    // A signal while the server starts (a proof can take minutes) stops it there.
    let started = tokio::select! {
        started = server::start(config) => started,
        signal = signals.next() => {
            tracing::info!(?signal, "stopped before serving");
            return ExitCode::SUCCESS;
        }
    };
    let mut running = match started {
        Ok(running) => running,
        Err(error @ Error::Policies(_)) => return fail(EXIT_INVALID_POLICIES, error),
        Err(error) => return fail(EXIT_FAILURE, error),
    };
    tokio::select! {
        result = running.wait() => {
            return match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(EXIT_FAILURE, error),
            };
        }
        signal = signals.next() => {
            if signal == Signal::Terminate && !drain.is_zero() {
                running.drain(drain, async { signals.next().await; }).await;
            }
        }
    }
    tracing::info!("shutting down");
    match running.stop().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(EXIT_FAILURE, error),
    }
}

/// A signal that stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGINT (Ctrl-C): stop without a drain.
    Interrupt,
    /// SIGTERM (systemd, Kubernetes): drain, then stop.
    Terminate,
}

/// The stopping signals. The handlers are installed by [`Signals::install`], not when
/// first polled: a signal that arrives while the server starts is not lost (and does
/// not kill the process with the default action).
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// The next stopping signal.
    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            async fn wait(signal: Option<&mut tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = wait(self.interrupt.as_mut()) => Signal::Interrupt,
                () = wait(self.terminate.as_mut()) => Signal::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Interrupt
        }
    }
}
