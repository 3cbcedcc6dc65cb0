//! `ringfence keys ... --server ADDR`: the client side of a running server's KeyAdmin
//! service (mutual TLS as a directory service, an employee token). Sends requests and
//! prints answers; decides nothing and never sees key bytes.

use std::path::{Path, PathBuf};

use ringfence::dev::DevPki;
use ringfence::pb;
use ringfence::pb::key_admin_client::KeyAdminClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

/// Environment variable holding the employee token when `--token-file` is not given.
pub const TOKEN_ENV: &str = "RINGFENCE_TOKEN";

/// How to reach a running server's KeyAdmin service.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address of a running server (host:port). The change goes through its KeyAdmin
    /// service: decided by policy for the employee of the token, logged, and live for
    /// every request that starts after it returns. Without it, the command changes
    /// the files directly and is refused while a server runs.
    #[arg(long)]
    pub server: Option<String>,
    /// CA certificate (PEM) the server's certificate is checked against.
    #[arg(long, requires = "server")]
    pub server_ca: Option<PathBuf>,
    /// Client certificate (PEM) of the service the request goes through, e.g. the key
    /// console's.
    #[arg(long, requires = "server")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, requires = "server")]
    pub client_key: Option<PathBuf>,
    /// DEVELOPMENT: take the CA, client certificate and key of this service from the
    /// development PKI in the data directory (`ringfence dev init`).
    #[arg(long, requires = "server", conflicts_with_all = ["server_ca", "client_cert", "client_key"])]
    pub dev_service: Option<String>,
    /// Name the server's certificate must carry.
    #[arg(long, default_value = "localhost", requires = "server")]
    pub server_name: String,
    /// File holding the employee's token (JWT) for `authorization: Bearer`; else the
    /// RINGFENCE_TOKEN environment variable.
    #[arg(long, requires = "server")]
    pub token_file: Option<PathBuf>,
    /// Why (recorded in the decision log, visible to policies), e.g.
    /// scheduled-rotation.
    #[arg(long, default_value = "", requires = "server")]
    pub purpose: String,
    /// Change ticket (recorded, visible to policies).
    #[arg(long, default_value = "", requires = "server")]
    pub ticket: String,
}

/// A connected client and the token its requests carry.
pub struct Remote {
    client: KeyAdminClient<Channel>,
    token: Zeroizing<String>,
    runtime: tokio::runtime::Runtime,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {what} `{}`: {error}", path.display()))
}

impl ServerArgs {
    /// Connects to `--server`, if given.
    pub fn connect(&self, data_dir: &Path) -> Result<Option<Remote>, String> {
        let Some(address) = &self.server else {
            return Ok(None);
        };
        let (ca, cert, key) = match (
            &self.dev_service,
            &self.server_ca,
            &self.client_cert,
            &self.client_key,
        ) {
            (Some(service), ..) => {
                let pki = DevPki::of(data_dir);
                (
                    pki.ca_cert(),
                    pki.client_cert(service),
                    pki.client_key(service),
                )
            }
            (None, Some(ca), Some(cert), Some(key)) => (ca.clone(), cert.clone(), key.clone()),
            _ => {
                return Err(
                    "--server needs --server-ca, --client-cert and --client-key (or, for development, --dev-service)"
                        .to_owned(),
                );
            }
        };
        let token = match &self.token_file {
            Some(path) => Zeroizing::new(
                String::from_utf8(read(path, "token file")?)
                    .map_err(|_| format!("token file `{}` is not UTF-8", path.display()))?,
            ),
            None => Zeroizing::new(std::env::var(TOKEN_ENV).map_err(|_| {
                format!("--server needs an employee token: pass --token-file or set {TOKEN_ENV}")
            })?),
        };
        let token = Zeroizing::new(token.trim().to_owned());
        let key_pem = Zeroizing::new(read(&key, "client key")?);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca, "server CA certificate")?))
            .identity(Identity::from_pem(
                read(&cert, "client certificate")?,
                key_pem.as_slice(),
            ))
            .domain_name(self.server_name.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("cannot start runtime: {error}"))?;
        let channel = runtime.block_on(async {
            Channel::from_shared(format!("https://{address}"))
                .map_err(|error| format!("bad --server `{address}`: {error}"))?
                .tls_config(tls)
                .map_err(|error| format!("TLS configuration: {error}"))?
                .connect_timeout(std::time::Duration::from_secs(10))
                .timeout(std::time::Duration::from_secs(60))
                .connect()
                .await
                .map_err(|error| format!("cannot connect to `{address}`: {error}"))
        })?;
        Ok(Some(Remote {
            client: KeyAdminClient::new(channel),
            token,
            runtime,
        }))
    }
}

impl Remote {
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, String> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token.as_str())
            .parse()
            .map_err(|_| "the token contains characters a header cannot carry".to_owned())?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }

    /// Sends one call and returns its answer; a refusal becomes its status message.
    pub fn call<T, R, F>(
        &self,
        message: T,
        send: impl FnOnce(KeyAdminClient<Channel>, tonic::Request<T>) -> F,
    ) -> Result<R, String>
    where
        F: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let request = self.request(message)?;
        self.runtime
            .block_on(send(self.client.clone(), request))
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    }
}

/// One line per version, as `keys list` prints them.
pub fn print_key_rings(key_rings: &[pb::KeyRing]) {
    for ring in key_rings {
        for version in &ring.versions {
            let state = pb::key_version::State::try_from(version.state)
                .map(|state| match state {
                    pb::key_version::State::Active => "active",
                    pb::key_version::State::DecryptOnly => "decrypt-only",
                    pb::key_version::State::Retired => "retired",
                    pb::key_version::State::Destroyed => "destroyed",
                    pb::key_version::State::Unspecified => "unknown",
                })
                .unwrap_or("unknown");
            println!(
                "{}\tv{}\t{}\t{}\t{state}\tgeneration {}",
                ring.jurisdiction,
                version.version,
                version.key_id,
                version.created_at,
                ring.generation
            );
        }
    }
}
