//! The metrics endpoint: `GET /metrics` over HTTP/1.1, one answer per connection,
//! in the OpenMetrics text format that Prometheus scrapes. Bounded so that idle or
//! slow clients cannot starve a scraper: at most [`MAX_PER_ADDRESS`] connections
//! from one address (more are closed), [`MAX_CONNECTIONS`] served at once (others
//! wait for a place up to 2 s, in arrival order), a request head within 2 s, a whole
//! exchange within 10 s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Connections served at once; more wait for a place (up to 2 s).
pub const MAX_CONNECTIONS: usize = 16;
/// Connections from one address, served or waiting; more are closed at once.
pub const MAX_PER_ADDRESS: usize = 4;
/// How long a connection waits for a place, then for its request head.
const PATIENCE: Duration = Duration::from_secs(2);
/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running metrics endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The accept loop; abort it to stop serving.
    pub task: JoinHandle<()>,
}

/// Binds `address` and serves `registry` on it.
pub async fn serve(address: SocketAddr, registry: Registry) -> std::io::Result<Endpoint> {
    let listener = TcpListener::bind(address).await?;
    let local_addr = listener.local_addr()?;
    let registry = Arc::new(registry);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let task = tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(place) = Place::take(&per_address, remote.ip()) else {
                continue;
            };
            let (registry, slots) = (Arc::clone(&registry), Arc::clone(&slots));
            tokio::spawn(async move {
                let _place = place;
                let Ok(Ok(_permit)) = tokio::time::timeout(PATIENCE, slots.acquire_owned()).await
                else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let answer = answer(&registry, request.method(), request.uri().path());
                    async move { Ok::<_, Infallible>(answer) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(PATIENCE)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
            });
        }
    });
    Ok(Endpoint { local_addr, task })
}

/// One connection's place in the per-address count, given back when it closes.
struct Place {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl Place {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, address: IpAddr) -> Option<Self> {
        let mut held = counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = held.entry(address).or_insert(0);
        if *count >= MAX_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(Self {
            counts: Arc::clone(counts),
            address,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

fn answer(registry: &Registry, method: &Method, path: &str) -> Response<String> {
    let plain = |status: StatusCode, body: &str| {
        let mut response = Response::new(body.to_owned());
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if path != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    let mut body = String::with_capacity(16 * 1024);
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!(%error, "metrics could not be encoded");
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded; the server log has details\n",
        );
    }
    let mut response = Response::new(body);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}
