//! The metrics endpoint: `GET /metrics` over HTTP/1.1, one answer per connection,
//! in the OpenMetrics text format that Prometheus scrapes. Bounded: at most
//! [`MAX_CONNECTIONS`] at once (more are closed), a request head within 5 s, a whole
//! exchange within 10 s.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
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
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                continue;
            };
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let answer = answer(&registry, request.method(), request.uri().path());
                    async move { Ok::<_, Infallible>(answer) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
            });
        }
    });
    Ok(Endpoint { local_addr, task })
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
