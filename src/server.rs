//! Assembles a running server from a [`ServeConfig`]: data directory, master key,
//! keyring, policies, decision log, then the gRPC services (ringfence, health,
//! reflection). The composition root; owns no logic of the modules it wires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::audit::{self, DecisionLog};
use crate::config::{self, Auth, ServeConfig};
use crate::dev::DevPki;
use crate::gatekeeper::Gatekeeper;
use crate::identity::tls;
use crate::keyadmin;
use crate::keys::{self, Keyring};
use crate::pb;
use crate::policy::{LoadError, PolicyStore};
use crate::reload;
use crate::service::{self, RingfenceService};

mod callers;

pub(crate) use callers::identity_mode;
use callers::{handshake_failures, reloadable_files};

/// gRPC name of the ringfence service, as health checks know it.
pub const SERVICE_NAME: &str = "ringfence.v1.Ringfence";
/// gRPC name of the key administration service, as health checks know it.
pub const KEY_ADMIN_SERVICE_NAME: &str = "ringfence.v1.KeyAdmin";
pub use crate::config::{LOG_DIR, POLICY_ARCHIVE_DIR};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is refused.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The policy directory does not load.
    #[error(transparent)]
    Policies(#[from] LoadError),
    /// The master key or keyring is unusable.
    #[error(transparent)]
    Keys(#[from] keys::Error),
    /// The decision log cannot be opened.
    #[error(transparent)]
    Log(#[from] audit::Error),
    /// The subject store is damaged, or sealed under another master key.
    #[error(transparent)]
    Subjects(#[from] crate::subjects::Error),
    /// The data directory or listen socket is unusable.
    #[error("{0}")]
    Io(String),
    /// The gRPC transport failed.
    #[error("transport error: {0}")]
    Transport(String),
}

/// The master key `config` names (a file, `RINGFENCE_MASTER_KEY`, or the development
/// key when allowed); `create` lets a development key be created.
pub(crate) fn master_key(
    config: &ServeConfig,
    create: bool,
) -> Result<keys::LocalMasterKey, keys::Error> {
    keys::load_master_key(
        config.master_key_env.as_ref(),
        config.master_key_file.as_deref(),
        &config.data_dir,
        keys::MasterKeyPolicy {
            allow_development: config.allow_development_master_key,
            create_development: create,
        },
    )
}

/// Opens everything the gatekeeper needs: policies, master key, keyring (created, with
/// a development master key, only when `create_missing_keys` is set, as by `--dev`),
/// the decision log (refusing a keyring rolled back behind its newest checkpoint).
pub async fn prepare(config: &ServeConfig) -> Result<Arc<Gatekeeper>, Error> {
    config.check()?;
    crate::fsutil::create_private_dir(&config.data_dir).map_err(|error| {
        Error::Io(format!(
            "cannot create data directory `{}`: {error}",
            config.data_dir.display()
        ))
    })?;
    // Proved (under the guard), archived for replay and recorded as serving before it
    // decides anything.
    let archive = config.data_dir.join(POLICY_ARCHIVE_DIR);
    let policies = Arc::new(PolicyStore::load_guarded(
        &config.policies,
        config.proof.clone(),
        &archive,
    )?);
    let snapshot = policies.current();
    tracing::info!(
        policies = snapshot.len(),
        hash = snapshot.hash(),
        dir = %config.policies.display(),
        proof = config.proof.mode.as_str(),
        "policy set loaded"
    );
    tracing::debug!(archive = %archive.display(), "policy set archived for replay");
    for jurisdiction in &config.jurisdictions {
        if !snapshot.jurisdictions().contains(jurisdiction) {
            tracing::warn!(
                %jurisdiction,
                "configured jurisdiction has no `Jurisdiction` entity in the policy directory: its records will be refused"
            );
        }
    }

    if config.auth == Auth::Dev {
        let pki = DevPki::of(&config.data_dir);
        let created = pki
            .init(&snapshot.service_ids())
            .map_err(|error| Error::Io(format!("cannot create the development PKI: {error}")))?;
        for path in created {
            tracing::info!(path = %path.display(), "created development PKI file");
        }
        tracing::warn!(
            dir = %pki.dir.display(),
            "--dev: mTLS and employee tokens from a development CA and identity provider whose keys sit in the data directory. NOT FOR PRODUCTION"
        );
    }
    let paths = keyadmin::DataPaths {
        data_dir: config.data_dir.clone(),
        checkpoint_key: config.checkpoint_key.clone(),
    };
    let master = master_key(config, config.create_missing_keys)?;
    if let keys::MasterKeyOrigin::Development { path, created } = master.origin() {
        tracing::warn!(
            path = %path.display(),
            created,
            "USING A DEVELOPMENT MASTER KEY stored next to the keyring: anyone who can read the data directory can unseal every key. NOT FOR PRODUCTION: set {} or pass --master-key-file",
            keys::MASTER_KEY_ENV
        );
    }
    // One writer at a time: the keyring lock while reading (and in development,
    // creating) keys, the log lock for the server's whole life.
    let holder =
        crate::fsutil::describe_process(&format!("`ringfence serve` on {}", config.listen));
    let keyring_lock = keys::lock(&config.data_dir, &holder)?;
    let keyring_path = paths.keyring();
    let existing = Keyring::open_if_present(&keyring_path, &master)?;
    let before = existing
        .as_ref()
        .map(Keyring::generations)
        .unwrap_or_default();

    let (signer, created, signing_key) = paths
        .signer()
        .map_err(|error| Error::Io(error.to_string()))?;
    if created {
        tracing::info!(key = %signing_key.display(), key_id = signer.key_id(), "created the decision log checkpoint signing key");
    }
    let (log, state) = DecisionLog::open_with(
        &paths.log(),
        audit::LogOptions {
            max_segment_bytes: config.log_segment_bytes,
            max_segment_age: config.log_segment_age,
            signer: Some(signer),
            key_generations: Some(before.clone()),
            holder: holder.clone(),
            metrics: Arc::new(crate::metrics::Metrics::new(&config.jurisdictions)),
            ..audit::LogOptions::default()
        },
    )?;
    // A change saved to the keyring but never logged (a crash in between) is recorded
    // now, before anything else is written.
    let unlogged = existing
        .as_ref()
        .map(|keyring| {
            keyadmin::unlogged_changes(&keyring.states(), state.newest_checkpoint.as_ref())
        })
        .unwrap_or_default();
    let actor = keyadmin::Actor::local(&holder);
    keyadmin::log_events(&log, before, &unlogged, &actor).await?;
    for event in &unlogged {
        tracing::warn!(jurisdiction = %event.jurisdiction, generation = event.generation, "the keyring is ahead of the decision log (a key change was saved but not logged); recorded as `unlogged`");
    }
    let mut keyring = match existing {
        Some(keyring) => keyring,
        None if config.create_missing_keys => Keyring::empty(&keyring_path),
        None => return Err(keys::Error::NoKeyring(keyring_path).into()),
    };
    let mut events = Vec::new();
    if config.create_missing_keys {
        for jurisdiction in &config.jurisdictions {
            if !keyring.holds(jurisdiction) {
                events.push(keyring.initialize(jurisdiction, &master)?);
            }
        }
        if !events.is_empty() {
            keyring.save()?;
        }
    }
    // The subject store, checked against the keyring's master key before anything
    // is written to it; under the keyring lock, as `keys rotate-master` re-seals it.
    let subjects =
        crate::subjects::Subjects::open(&config.data_dir, &keyring, config.subject_cache_entries)?;
    drop(keyring_lock);
    drop(master);
    keyring.configure_encryption(&config.jurisdictions)?;
    keyadmin::log_events(&log, keyring.generations(), &events, &actor).await?;
    for event in &events {
        tracing::info!(jurisdiction = %event.jurisdiction, key_id = %event.key_id, "created root key version 1");
    }
    if let Some(torn) = &state.torn_tail {
        tracing::warn!(
            segment = %torn.display(),
            "decision log segment ends in a torn line (a crash mid-write); left in place, continuing in a new segment"
        );
    }
    tracing::info!(
        entries = state.last_seq,
        segment = state.segment,
        "decision log open"
    );
    Ok(Arc::new(Gatekeeper::new(
        keyring,
        Arc::new(subjects),
        policies,
        log,
        config.limits,
    )))
}

/// Oldest a client connection may grow before the server asks it to reconnect.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);
/// How long calls in flight on a connection past [`MAX_CONNECTION_AGE`] may go on
/// before the connection is closed under them.
const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(600);

/// How long shutdown waits for open connections to finish their calls.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long shutdown waits for follow-up work (answers of calls that went away and
/// their `undelivered` entries) after the last request ended.
const FOLLOW_UP_PATIENCE: Duration = Duration::from_secs(10);

/// A server running in the background.
#[derive(Debug)]
pub struct Running {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// Where metrics are served, when they are (`--metrics-listen`).
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
    background: Vec<JoinHandle<()>>,
    /// Keeps health in step with the decision log until a drain takes over.
    health_follower: Option<JoinHandle<()>>,
    health: tonic_health::server::HealthReporter,
    _policy_watcher: reload::Watcher,
    log: DecisionLog,
    follow_ups: service::FollowUps,
}

impl Running {
    /// Drains before a stop: health answers `NOT_SERVING` for every service while the
    /// server keeps accepting and answering, for `window` or until `cut_short`
    /// resolves, so that load balancers and clients move to other replicas before the
    /// listener closes. Call [`Running::stop`] after it.
    pub async fn drain(
        &mut self,
        window: Duration,
        cut_short: impl std::future::Future<Output = ()>,
    ) {
        if let Some(follower) = self.health_follower.take() {
            follower.abort();
        }
        for name in [SERVICE_NAME, KEY_ADMIN_SERVICE_NAME, ""] {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        tracing::info!(
            drain_secs = window.as_secs_f64(),
            "draining: health says NOT_SERVING, requests are still served"
        );
        tokio::select! {
            () = tokio::time::sleep(window) => {}
            () = cut_short => tracing::info!("drain cut short by a second signal"),
        }
    }

    /// Stops accepting requests, lets running ones finish, and waits.
    pub async fn stop(mut self) -> Result<(), Error> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Bulk streams stop reading, so that their calls can finish.
        self.follow_ups.close();
        for task in self.background.iter().chain(&self.health_follower) {
            task.abort();
        }
        // Open streams (an idle client, a stalled one) would hold a graceful stop
        // forever: after the grace period the server stops without them.
        let served = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => Err(Error::Transport(error.to_string())),
            Err(_) => {
                tracing::warn!(
                    grace_secs = SHUTDOWN_GRACE.as_secs(),
                    "connections still open after the grace period: stopping without them"
                );
                self.task.abort();
                Ok(())
            }
        };
        // Answers of calls that went away, and their `undelivered` entries, are
        // written before the log is signed for the last time.
        let still_running = self.follow_ups.drain(FOLLOW_UP_PATIENCE).await;
        if still_running > 0 {
            tracing::error!(
                still_running,
                "shutdown did not wait longer for follow-up work: answers of cancelled calls may lack their `undelivered` entries"
            );
        }
        // Requests have finished: sign the final head so nothing is left unvouched.
        if let Err(error) = self.log.checkpoint().await {
            tracing::warn!(%error, "no final checkpoint");
        }
        served
    }

    /// Waits until the server stops by itself (a transport error).
    pub async fn wait(&mut self) -> Result<(), Error> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(error) => Err(Error::Transport(error.to_string())),
        }
    }
}

/// Prepares, binds and starts serving.
pub async fn start(config: ServeConfig) -> Result<Running, Error> {
    if matches!(config.auth, Auth::Mtls { .. }) {
        // Refuse a broken TLS or token configuration before creating anything.
        config.check()?;
        identity_mode(&config)?;
    }
    let gate = prepare(&config).await?;
    start_with(gate, &config).await
}

/// Binds and serves an already assembled gatekeeper (tests use this to inject faults).
pub async fn start_with(gate: Arc<Gatekeeper>, config: &ServeConfig) -> Result<Running, Error> {
    config.check()?;
    let (mode, tls, tokens) = identity_mode(config)?;
    if let Some(tls) = &tls {
        tracing::info!(
            trust_domain = tls.trust_domain,
            client_crl = ?tls.verifier.crl_path(),
            revocation_lists = tls.verifier.lists().len(),
            employee_tokens = tokens.is_some(),
            "mutual TLS: services from client certificates{}",
            if tokens.is_some() {
                ", employees from signed tokens"
            } else {
                ""
            }
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| Error::Io(format!("cannot listen on `{}`: {error}", config.listen)))?;
    let local_addr = listener
        .local_addr()
        .map_err(|error| Error::Io(error.to_string()))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in [SERVICE_NAME, KEY_ADMIN_SERVICE_NAME] {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    health.set_service_status("", ServingStatus::Serving).await;
    // Reflection in both versions: grpcurl and Python's grpcio-reflection ask v1alpha.
    let reflecting = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflecting()
        .build_v1()
        .map_err(|error| Error::Transport(error.to_string()))?;
    let reflection_v1alpha = reflecting()
        .build_v1alpha()
        .map_err(|error| Error::Transport(error.to_string()))?;

    let ringfence = RingfenceService::new(Arc::clone(&gate), config.max_message_bytes)
        .with_stream_limits(config.streams);
    let lobby = tls::Lobby::default();
    let mut background = Vec::new();
    let metrics_addr = match config.metrics_listen {
        None => None,
        Some(address) => {
            let (usage, lobby) = (ringfence.clone(), lobby.clone());
            let registry = gate.metrics().registry(crate::metrics::State {
                gate: Arc::clone(&gate),
                slots: Box::new(move || crate::metrics::Slots {
                    handshakes: lobby.waiting(),
                    ..usage.usage()
                }),
            });
            let endpoint = crate::metrics::serve(address, registry)
                .await
                .map_err(|error| {
                    Error::Io(format!(
                        "cannot serve metrics on `{address}` (--metrics-listen): {error}"
                    ))
                })?;
            // Not `address=`: scripts read the gRPC address from that field.
            let url = format!("http://{}/metrics", endpoint.local_addr);
            if !endpoint.local_addr.ip().is_loopback() {
                tracing::warn!(%url, "metrics are served without TLS or authentication off loopback: keep the port to your monitoring network");
            }
            tracing::info!(%url, "metrics served");
            background.push(endpoint.task);
            Some(endpoint.local_addr)
        }
    };
    let follow_ups = ringfence.follow_ups();
    let key_admin = ringfence.key_admin();
    let ringfence = pb::ringfence_server::RingfenceServer::new(ringfence)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let admission = service::Admission::new(mode, Arc::clone(&gate));
    let ringfence = service::Admitted::new(ringfence, admission.clone());
    let key_admin =
        pb::key_admin_server::KeyAdminServer::new(key_admin).max_decoding_message_size(64 * 1024);
    let key_admin = service::Admitted::new(key_admin, admission);

    // Health follows the decision log: without it nothing can be served.
    let log = gate.log().clone();
    let follower_health = health.clone();
    let health_follower = tokio::spawn(async move {
        let health = follower_health;
        let mut serving = true;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let healthy = log.is_healthy();
            if healthy != serving {
                serving = healthy;
                let status = if healthy {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for name in [SERVICE_NAME, KEY_ADMIN_SERVICE_NAME] {
                    health.set_service_status(name, status).await;
                }
                health.set_service_status("", status).await;
            }
        }
    });
    // Entries written just before a quiet spell get their checkpoint within a second,
    // not with the next request.
    let checkpoints = gate.log().clone();
    background.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(audit::DEFAULT_CHECKPOINT_INTERVAL).await;
            if let Err(error) = checkpoints.checkpoint().await {
                tracing::debug!(%error, "periodic checkpoint not written");
            }
        }
    }));
    let (policy_watcher, reload_tasks) = reload::spawn(
        Arc::clone(gate.policies()),
        config.watch_policies,
        reloadable_files(tokens, tls.as_ref()),
    );
    background.extend(reload_tasks);

    let incoming = tls::incoming(listener, tls, handshake_failures(Arc::clone(&gate)), lobby);
    let (shutdown, shutdown_signal) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .concurrency_limit_per_connection(256)
            // hyper's default is unlimited streams per connection.
            .max_concurrent_streams(256)
            // Certificates and tokens are checked per request, but a connection is
            // not kept for ever either.
            .max_connection_age(MAX_CONNECTION_AGE)
            .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(ringfence)
            .add_service(key_admin)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_signal.await;
            })
            .await
            .map_err(|error| Error::Transport(error.to_string()))
    });
    tracing::info!(address = %local_addr, "ringfence listening");
    Ok(Running {
        local_addr,
        metrics_addr,
        shutdown: Some(shutdown),
        task,
        background,
        health_follower: Some(health_follower),
        health,
        _policy_watcher: policy_watcher,
        log: gate.log().clone(),
        follow_ups,
    })
}
