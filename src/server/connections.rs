//! Serving HTTP/2 connections, with the settings tonic's own server does not expose: each
//! connection from the accept loop is served by hyper with the layered routes, its connect
//! info (peer address, client certificate) in every request's extensions as tonic's server
//! puts it, and a bounded send buffer per stream. On the stop signal the accept loop is
//! dropped (no new connections), every connection is asked to finish gracefully (GOAWAY;
//! calls in flight complete), and serving ends when the last one has closed.

use std::{convert::Infallible, io};

use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tonic::{
    body::Body,
    codegen::http::{Request, Response},
    transport::server::Connected,
};
use tower::{Service, ServiceExt};

/// Serves every connection of `incoming` with `service` until `stop` resolves, then waits for
/// the open connections to finish.
pub async fn serve<IO, S, ResBody>(
    incoming: impl Stream<Item = io::Result<IO>>,
    service: S,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    stop: impl Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    S: Service<Request<Body>, Response = Response<ResBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Each connection holds a receiver: the sender learns when all are gone.
    let (stopping, watching) = watch::channel(false);
    {
        let incoming = std::pin::pin!(incoming);
        let mut incoming = incoming.fuse();
        let mut stop = std::pin::pin!(stop);
        loop {
            let io = tokio::select! {
                () = &mut stop => break,
                io = incoming.next() => match io {
                    Some(Ok(io)) => io,
                    // The accept loop logs and counts its own failures.
                    Some(Err(_)) => continue,
                    None => break,
                },
            };
            let info = io.connect_info();
            let service = service
                .clone()
                .map_request(move |request: Request<Incoming>| {
                    let mut request = request.map(Body::new);
                    request.extensions_mut().insert(info.clone());
                    request
                });
            let connection =
                http2.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
            let mut watching = watching.clone();
            tokio::spawn(async move {
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(error) = served {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        return;
                    }
                    _ = watching.wait_for(|stopping| *stopping) => {}
                }
                connection.as_mut().graceful_shutdown();
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "connection ended with an error while draining");
                }
                drop(watching);
            });
        }
    }
    drop(watching);
    let _ = stopping.send(true);
    stopping.closed().await;
}
