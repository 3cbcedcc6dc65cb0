//! The process's log subscriber: human-readable lines on stderr (filtered by
//! `RINGFENCE_LOG`), and, when built with the `otlp` feature and asked with
//! `serve --otlp-endpoint`, request spans exported over OTLP/gRPC. May not log
//! anything itself.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Where the OTLP layer goes once `serve` knows its endpoint.
#[cfg(feature = "otlp")]
type Slot = tracing_subscriber::reload::Handle<
    Option<Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>>,
    tracing_subscriber::Registry,
>;

/// The installed subscriber.
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    slot: Slot,
}

/// Installs the subscriber for the whole process.
pub fn init() -> Telemetry {
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr (a log pipe or journald gone) must not kill the server:
        // tracing-subscriber would report the failed write with `eprintln!`, which
        // panics when stderr is closed.
        .log_internal_errors(false)
        .with_filter(
            EnvFilter::try_from_env("RINGFENCE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        );
    #[cfg(feature = "otlp")]
    {
        let (slot, handle) = tracing_subscriber::reload::Layer::new(None);
        tracing_subscriber::registry().with(slot).with(lines).init();
        Telemetry { slot: handle }
    }
    #[cfg(not(feature = "otlp"))]
    {
        tracing_subscriber::registry().with(lines).init();
        Telemetry {}
    }
}

/// Span export, running until [`Exporting::shutdown`].
pub struct Exporting {
    #[cfg(feature = "otlp")]
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Exporting {
    /// Exports the spans still buffered and stops (waits at most a few seconds).
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "spans not exported at shutdown");
        }
    }
}

impl Telemetry {
    /// Starts exporting `ringfence` spans (request, record) to the OTLP/gRPC collector
    /// at `endpoint` (e.g. `http://127.0.0.1:4317`). Call inside the Tokio runtime.
    #[cfg(feature = "otlp")]
    pub fn export_to(&self, endpoint: &str) -> Result<Exporting, String> {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_otlp::WithExportConfig as _;

        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|error| format!("OTLP exporter for `{endpoint}`: {error}"))?;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("ringfence")
                    .build(),
            )
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ringfence"))
            // ringfence's spans only, never events: a log line (an error naming a
            // principal, say) stays in the server log and does not travel as a span
            // event to the collector.
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.is_span()
                    && metadata.target().starts_with("ringfence")
                    && *metadata.level() <= tracing::Level::INFO
            }))
            .boxed();
        self.slot
            .reload(Some(layer))
            .map_err(|error| format!("cannot install the OTLP layer: {error}"))?;
        Ok(Exporting { provider })
    }

    /// Without the `otlp` feature: a clear refusal.
    #[cfg(not(feature = "otlp"))]
    pub fn export_to(&self, endpoint: &str) -> Result<Exporting, String> {
        Err(format!(
            "--otlp-endpoint {endpoint}: this ringfence was built without the `otlp` feature (cargo build --release --features otlp)"
        ))
    }
}
