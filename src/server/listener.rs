//! The accept loop, built to survive hostile peers:
//! - at most `grpc.max_connections` connections are open (in handshake or served); one more is
//!   closed at once and counted;
//! - a connection must finish its TLS handshake **and**, on the gRPC port, send the HTTP/2
//!   preface within `grpc.handshake_timeout`, or it is closed and counted (OTLP/HTTP's port
//!   leaves the first request's headers to hyper's timeout of the same length); handshakes run
//!   on their own tasks, so a slow one never holds up the next accept;
//! - `accept` failures (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off exponentially, are logged at
//!   most once per interval and counted: the loop never spins.
//!
//! What comes out is a stream of [`Connection`]s for tonic's `serve_with_incoming_shutdown`,
//! each holding its connection slot until hyper drops it.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    backoff::Backoff,
    metrics::{self, ConnectionFailure},
};

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Connections established and not yet taken by the server.
const READY_QUEUE: usize = 128;
/// TCP keepalive on accepted sockets.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// First and longest pause after an `accept` failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per kind of trouble per interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections in their handshake at once: peers that have proved nothing yet can hold
    /// these slots, never the ones of served connections.
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    /// Whether a connection must send the HTTP/2 preface within the handshake timeout (the
    /// gRPC port); an HTTP/1.1 port leaves the first request to hyper's header timeout.
    pub http2_preface: bool,
}

/// Accepts on `listener` until the returned stream is dropped. With `tls`, connections are
/// TLS streams (mutual TLS, as `tls` requires); without, plain TCP.
pub fn incoming<S>(
    listener: TcpListener,
    limits: Limits,
    establish: impl Fn(TcpStream) -> Establish<S> + Send + Sync + 'static,
) -> ReceiverStream<io::Result<Connection<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ready, stream) = mpsc::channel(READY_QUEUE);
    tokio::spawn(accept_loop(listener, limits, Arc::new(establish), ready));
    ReceiverStream::new(stream)
}

/// A future that turns an accepted socket into the stream the server reads (a TLS handshake,
/// or nothing).
pub type Establish<S> = Pin<Box<dyn Future<Output = io::Result<S>> + Send>>;

/// Establishes TLS with `acceptor` (mutual TLS, as its config requires).
pub fn tls(acceptor: TlsAcceptor) -> impl Fn(TcpStream) -> Establish<TlsStream<TcpStream>> {
    move |tcp| {
        let acceptor = acceptor.clone();
        Box::pin(async move { acceptor.accept(tcp).await })
    }
}

/// Plain TCP (the explicit, loudly logged plaintext opt-in).
pub fn plaintext() -> impl Fn(TcpStream) -> Establish<TcpStream> {
    |tcp| Box::pin(async move { Ok(tcp) })
}

async fn accept_loop<S, E>(
    listener: TcpListener,
    limits: Limits,
    establish: Arc<E>,
    ready: mpsc::Sender<io::Result<Connection<S>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Fn(TcpStream) -> Establish<S> + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
    let mut accept_log = LogThrottle::default();
    let mut limit_log = LogThrottle::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = ready.closed() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                backoff.reset();
                tcp
            }
            Err(error) => {
                let kind = accept_error_kind(&error);
                metrics::accept_error(kind);
                if kind == "aborted" {
                    continue;
                }
                let pause = backoff.next_delay();
                if accept_log.ready(Instant::now()) {
                    tracing::error!(%error, kind, ?pause, "cannot accept connections; backing off");
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = ready.closed() => return,
                }
                continue;
            }
        };
        let (Ok(slot), Ok(handshaking)) = (
            slots.clone().try_acquire_owned(),
            handshakes.clone().try_acquire_owned(),
        ) else {
            metrics::connection_failed(ConnectionFailure::Limit);
            if limit_log.ready(Instant::now()) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    max_handshakes = limits.max_handshakes,
                    "connection limit reached; closing new connections"
                );
            }
            drop(tcp);
            continue;
        };
        let slot = OpenSlot::new(slot);
        configure_socket(&tcp);
        let handshake = establish(tcp);
        let ready = ready.clone();
        tokio::spawn(async move {
            let _handshaking = handshaking;
            let connection = match tokio::time::timeout(
                limits.handshake_timeout,
                handshake_then_preface(handshake, limits.http2_preface),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(failure)) => {
                    metrics::connection_failed(failure);
                    return;
                }
                Err(_) => {
                    metrics::connection_failed(ConnectionFailure::Timeout);
                    return;
                }
            };
            let (io, preface) = connection;
            let _ = ready
                .send(Ok(Connection {
                    io,
                    preface: Bytes::from_static(PREFACE).slice(..preface),
                    _slot: slot,
                }))
                .await;
        });
    }
}

/// TLS (or nothing), then, when `preface` is asked for, the 24-byte HTTP/2 preface. Returns
/// the stream and how many preface bytes were read from it (all of them, or none).
async fn handshake_then_preface<S>(
    handshake: Establish<S>,
    preface: bool,
) -> Result<(S, usize), ConnectionFailure>
where
    S: AsyncRead + Unpin,
{
    let mut stream = handshake.await.map_err(|_| ConnectionFailure::Tls)?;
    if !preface {
        return Ok((stream, 0));
    }
    let mut preface = [0u8; PREFACE.len()];
    stream
        .read_exact(&mut preface)
        .await
        .map_err(|_| ConnectionFailure::Closed)?;
    if &preface != PREFACE {
        return Err(ConnectionFailure::BadPreface);
    }
    Ok((stream, PREFACE.len()))
}

fn configure_socket(tcp: &TcpStream) {
    // Best effort: a socket that refuses these options still works.
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

/// The `kind` label of an accept failure.
fn accept_error_kind(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(code) if code == nix::libc::EMFILE => "emfile",
        Some(code) if code == nix::libc::ENFILE => "enfile",
        Some(code) if code == nix::libc::ENOBUFS || code == nix::libc::ENOMEM => "no_memory",
        _ if matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
        ) =>
        {
            "aborted"
        }
        _ => "other",
    }
}

/// Lets one log line through per [`LOG_INTERVAL`].
#[derive(Default)]
struct LogThrottle {
    last: Option<Instant>,
}

impl LogThrottle {
    fn ready(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < LOG_INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// A connection slot (from accept until hyper drops the connection), counted in
/// `sluice_connections_open` while held.
struct OpenSlot {
    _permit: OwnedSemaphorePermit,
}

impl OpenSlot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::connection_opened();
        Self { _permit: permit }
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        metrics::connection_closed();
    }
}

/// An established connection: its stream, the preface bytes already read from it (handed to
/// hyper first), and its slot.
pub struct Connection<S> {
    io: S,
    preface: Bytes,
    _slot: OpenSlot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Connection<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.preface.has_remaining() {
            let count = self.preface.len().min(buf.remaining());
            buf.put_slice(&self.preface[..count]);
            self.preface.advance(count);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<S: Connected> Connected for Connection<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The default `grpc.max_connections`: the open-file limit (raised to its hard limit first)
/// less room for the database pools, the spool and the metrics endpoint.
pub fn default_max_connections() -> usize {
    const RESERVED_FDS: u64 = 256;
    const FLOOR: u64 = 64;
    let limit = raise_open_file_limit();
    limit.saturating_sub(RESERVED_FDS).max(FLOOR) as usize
}

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn log_lines_are_throttled_per_interval() {
        let mut throttle = LogThrottle::default();
        assert!(throttle.ready(Instant::now()));
        assert!(!throttle.ready(Instant::now()));
        tokio::time::advance(LOG_INTERVAL).await;
        assert!(throttle.ready(Instant::now()));
    }

    #[test]
    fn fd_exhaustion_is_told_apart_from_a_client_that_went_away() {
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        assert_eq!(accept_error_kind(&emfile), "emfile");
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(accept_error_kind(&aborted), "aborted");
    }

    #[tokio::test]
    async fn the_preface_is_handed_back_before_the_rest_of_the_stream() {
        let (client, server) = tokio::io::duplex(64);
        let mut client = client;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest")
            .await
            .expect("write");
        let handshake: Establish<tokio::io::DuplexStream> = Box::pin(async move { Ok(server) });
        let (io, read) = handshake_then_preface(handshake, true)
            .await
            .expect("preface");
        let slot = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("slot");
        let mut connection = Connection {
            io,
            preface: Bytes::from_static(PREFACE).slice(..read),
            _slot: OpenSlot::new(slot),
        };
        let mut seen = vec![0u8; PREFACE.len() + 4];
        connection.read_exact(&mut seen).await.expect("read");
        assert_eq!(&seen[..24], PREFACE);
        assert_eq!(&seen[24..], b"rest");
    }

    #[tokio::test]
    async fn anything_but_the_http2_preface_is_refused() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let handshake: Establish<tokio::io::DuplexStream> = Box::pin(async move { Ok(server) });
        assert!(matches!(
            handshake_then_preface(handshake, true).await,
            Err(ConnectionFailure::BadPreface)
        ));
    }
}
