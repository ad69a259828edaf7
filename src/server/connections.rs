//! Serving connections, with the settings tonic's own server does not expose: each
//! connection from the accept loop is served by hyper (HTTP/2 for gRPC, HTTP/1.1 for
//! OTLP/HTTP) with the layered routes, its connect info (peer address, client certificate) in
//! every request's extensions as tonic's server puts it. On the stop signal the accept loop
//! is dropped (no new connections), every connection is asked to finish gracefully (GOAWAY,
//! or closing after the response in flight; calls in flight complete), and serving ends when
//! the last one has closed.

use std::{convert::Infallible, fmt::Display, io};

use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::{server::graceful::GracefulConnection, service::TowerToHyperService};
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

/// `service` for one connection, as hyper calls it: each request carries the connection's
/// `info` in its extensions, where tonic's server would put it.
pub fn for_connection<S, ResBody, Info>(
    service: S,
    info: Info,
) -> TowerToHyperService<
    impl Service<
        Request<Incoming>,
        Response = Response<ResBody>,
        Error = Infallible,
        Future = S::Future,
    > + Clone,
>
where
    S: Service<Request<Body>, Response = Response<ResBody>, Error = Infallible> + Clone,
    Info: Clone + Send + Sync + 'static,
{
    TowerToHyperService::new(service.map_request(move |request: Request<Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(info.clone());
        request
    }))
}

/// Serves every connection of `incoming`, each made into a hyper connection by `connect`,
/// until `stop` resolves, then waits for the open connections to finish.
pub async fn serve<IO, C>(
    incoming: impl Stream<Item = io::Result<IO>>,
    connect: impl Fn(IO) -> C,
    stop: impl Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    C: GracefulConnection + Send + 'static,
    C::Error: Display,
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
            let connection = connect(io);
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
