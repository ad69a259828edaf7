//! Phase 4: serves the routes on the gRPC listener (mTLS, or the loudly logged plaintext
//! opt-in), and OTLP/HTTP on its own listener when `otlp.http_listen` is set (the same TLS,
//! HTTP/1.1), behind the hardened accept loop of [`super::listener`], until SIGTERM or SIGINT,
//! then drains within `shutdown_timeout`. Every call passes the same layers: a request id,
//! the RPC's span, the record of its duration and code, and the oversized-request rewrite.
//! Connections are served by [`super::connections`] (hyper, with HTTP/2's send buffer per
//! stream bounded), not by tonic's `Server`, which does not expose that setting. A client's
//! `grpc-timeout` is enforced by the client, which resets the stream at its deadline; the
//! server then drops the call.

use std::{io, net::SocketAddr, sync::Arc};

use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
};
use tonic::transport::server::Connected;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use super::{
    ServerError, background::Background, connections, listener, services::Served,
    signals::StopSignals,
};
use crate::{
    config::Config,
    metrics,
    proto::status,
    rpc::record::RecordLayer,
    telemetry,
    tls::{self, TlsError},
};

/// The most HTTP/2 queues for one response stream beyond what its client's flow-control
/// window takes (hyper's default is 400 KB): a stream whose client stops reading, such as an
/// idle Tail, holds this much at most.
const MAX_SEND_BUFFER: usize = 32 * 1024;

/// The `listener` field of the "listening" log lines, which tools read to find the ports.
pub const GRPC_LISTENER: &str = "grpc";
pub const METRICS_LISTENER: &str = "metrics";
pub const OTLP_HTTP_LISTENER: &str = "otlp_http";

/// Serves `/metrics` when `metrics.listen` is set.
pub async fn serve_metrics(config: &Config) -> Result<(), ServerError> {
    if let Some(address) = config.metrics.listen {
        let handle = metrics::install()?;
        let bound = metrics::serve(handle, address).await?;
        tracing::info!(listener = METRICS_LISTENER, address = %bound, "metrics endpoint listening on /metrics");
    }
    Ok(())
}

/// Creates dev certificates on first run (unless paths are configured) and loads the mTLS
/// config. None when plaintext was explicitly requested.
pub fn prepare_tls(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    if config.tls.insecure_plaintext {
        tracing::warn!(
            "!!! TLS IS DISABLED (--insecure-plaintext): traffic and events travel in clear text and clients are not authenticated. Use only for local development. !!!"
        );
        return Ok(None);
    }
    if config.tls.uses_dev_certs() && tls::ensure_dev_certs(&config.tls.cert_dir, "client")? {
        tracing::warn!(
            dir = %config.tls.cert_dir.display(),
            "created development certificates (ca.pem, server.pem/key, client.pem/key); use real certificates in production"
        );
    }
    Ok(Some(tls::server_tls_config(config)?))
}

/// The span of one RPC: its method, request id and trace id (a child of the caller's span when
/// the request carries `traceparent`); the envelope adds the principal.
fn rpc_span<B>(request: &tonic::codegen::http::Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "rpc",
        otel.name = %request.uri().path(),
        otel.kind = "server",
        rpc.system = "grpc",
        method = %request.uri().path(),
        rpc = request.uri().path().rsplit('/').next().unwrap_or_default(),
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        principal = tracing::field::Empty,
    );
    telemetry::adopt_caller(&span, request.headers());
    span
}

/// Binds `address`, naming it in the error.
async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let bind_error = |source| ServerError::Bind { address, source };
    let listener = TcpListener::bind(address).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

/// Serves until SIGTERM or SIGINT, then gives in-flight calls and the writers
/// `shutdown_timeout` to finish.
pub async fn until_signal(
    config: &Config,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    served: Served,
    background: &Background,
) -> Result<(), ServerError> {
    let otlp_http = match config.otlp.http_listen {
        Some(address) => {
            let (listener, bound) = bind(address).await?;
            tracing::info!(
                listener = OTLP_HTTP_LISTENER,
                address = %bound,
                tls = tls_config.is_some(),
                "sluice listening for OTLP/HTTP on /v1/logs"
            );
            Some(listener)
        }
        None => None,
    };
    let (listener, bound) = bind(config.listen).await?;
    // Handlers first: a signal right after "listening" must start a shutdown, not kill.
    let signals = StopSignals::install();
    let limits = listener::Limits {
        max_connections: match config.grpc.max_connections {
            0 => listener::default_max_connections(),
            configured => {
                listener::raise_open_file_limit();
                configured
            }
        },
        max_handshakes: config.grpc.max_handshakes,
        handshake_timeout: config.grpc.handshake_timeout,
        http2_preface: true,
    };
    // OTLP/HTTP's port: the same limits, HTTP/1.1.
    let http_limits = listener::Limits {
        http2_preface: false,
        ..limits
    };
    tracing::info!(
        listener = GRPC_LISTENER,
        address = %bound,
        tls = tls_config.is_some(),
        max_connections = limits.max_connections,
        handshake_timeout = ?limits.handshake_timeout,
        "sluice listening"
    );
    match tls_config {
        Some(tls_config) => {
            let http_incoming = otlp_http.map(|listener| {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls::for_http1(&tls_config));
                listener::incoming(listener, http_limits, listener::tls(acceptor))
            });
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
            let incoming = listener::incoming(listener, limits, listener::tls(acceptor));
            let listening = Listening {
                grpc: incoming,
                otlp_http: http_incoming,
            };
            serve(config, served, listening, signals, background).await
        }
        None => {
            let http_incoming = otlp_http
                .map(|listener| listener::incoming(listener, http_limits, listener::plaintext()));
            let incoming = listener::incoming(listener, limits, listener::plaintext());
            let listening = Listening {
                grpc: incoming,
                otlp_http: http_incoming,
            };
            serve(config, served, listening, signals, background).await
        }
    }
}

/// The connections of each listener.
struct Listening<G, H> {
    grpc: G,
    otlp_http: Option<H>,
}

/// Serves the listeners' connections until the signal, then drains.
async fn serve<IO, G, H>(
    config: &Config,
    served: Served,
    listening: Listening<G, H>,
    signals: StopSignals,
    background: &Background,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    G: Stream<Item = io::Result<IO>>,
    H: Stream<Item = io::Result<IO>> + Send + 'static,
{
    // OTLP/HTTP on its own task, stopped with the rest and awaited in the drain below.
    let otlp_http = listening.otlp_http.map(|incoming| {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.grpc.handshake_timeout);
        let router = served.otlp_http;
        let stopping = background.shutdown_token().cancelled_owned();
        tokio::spawn(connections::serve(
            incoming,
            move |io: IO| {
                let info = io.connect_info();
                http1.serve_connection(
                    TokioIo::new(io),
                    connections::for_connection(router.clone(), info),
                )
            },
            stopping,
        ))
    });
    let shutdown_timeout = config.shutdown_timeout;
    let stop_signal = async {
        signals.wait().await;
        tracing::info!(timeout = ?shutdown_timeout, "shutting down: refusing new events, draining the buffer");
        background.trip();
    };
    let service = tower::ServiceBuilder::new()
        // A request id on every call: the client's `x-request-id`, or a new UUID. It is echoed
        // in the response headers and is a field of every log line of the call.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_grpc().make_span_with(rpc_span))
        // Outside the rewrite below: the recorded code is the one the client sees.
        .layer(RecordLayer)
        .layer(tower::util::MapResponseLayer::new(
            status::oversized_unary_to_invalid_argument,
        ))
        .service(served.grpc.prepare());
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(config.grpc.keepalive_interval)
        .keep_alive_timeout(config.grpc.keepalive_timeout)
        .max_concurrent_streams(config.grpc.max_concurrent_streams)
        .max_send_buf_size(MAX_SEND_BUFFER);
    let serve = connections::serve(
        listening.grpc,
        move |io: IO| {
            let info = io.connect_info();
            http2.serve_connection(
                TokioIo::new(io),
                connections::for_connection(service.clone(), info),
            )
        },
        stop_signal,
    );
    tokio::pin!(serve);
    // Serving ends on its own after the signal when no connection is open: the signal trips
    // shutdown inside the same poll. Serving that ends while not stopping means the accept
    // loop stopped.
    let ended = tokio::select! {
        biased;
        () = background.stopping() => None,
        result = &mut serve => Some(result),
    };
    if !background.is_stopping() && ended.is_some() {
        return Err(ServerError::AcceptLoopStopped);
    }
    let drain = async {
        if ended.is_none() {
            (&mut serve).await;
        }
        if let Some(otlp_http) = otlp_http {
            let _ = otlp_http.await;
        }
        background.writers_drained().await;
    };
    match tokio::time::timeout(shutdown_timeout, drain).await {
        Ok(()) => Ok(()),
        Err(_) => {
            let left = background.buffer.usage().events;
            tracing::error!(
                unacknowledged_events = left,
                "shutdown timeout reached; events not yet acknowledged were not stored and clients were not told they were"
            );
            Ok(())
        }
    }
}
