//! `sluice_rpc_duration_seconds`, recorded in one place for every RPC: a tower layer around
//! the gRPC routes reads each call's status where gRPC puts it (the headers of a trailers-only
//! answer, else the trailers at the end of the response stream) and records the call's whole
//! duration with it. A response stream dropped before its trailers (the client went away) is
//! recorded as `CANCELLED`.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame};
use tonic::{
    Code,
    codegen::http::{HeaderMap, Request, Response},
};
use tower::{Layer, Service};

use super::Rpc;
use crate::metrics;

/// Records the duration and code of every sluice RPC served through it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordLayer;

impl<S> Layer<S> for RecordLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Record { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Record<S> {
    inner: S,
}

impl<S, RequestBody, ResponseBody> Service<Request<RequestBody>> for Record<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<Recorded<ResponseBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let mut timing = rpc.map(|rpc| Timing { rpc, started });
            // A trailers-only answer (every refusal and every unary error) has its status in
            // the headers.
            if let Some(code) = status_of(response.headers())
                && let Some(timing) = timing.take()
            {
                timing.finish(code);
            }
            Ok(response.map(|body| Recorded { body, timing }))
        })
    }
}

/// A call not yet recorded.
#[derive(Debug)]
struct Timing {
    rpc: Rpc,
    started: Instant,
}

impl Timing {
    fn finish(self, code: Code) {
        metrics::rpc_finished(self.rpc.name(), code, self.started.elapsed());
    }
}

/// The `grpc-status` of a header map, when it has one.
fn status_of(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// A response body that records its call at its trailers, or when it is dropped without them.
#[derive(Debug)]
pub struct Recorded<B> {
    body: B,
    timing: Option<Timing>,
}

impl<B: Body + Unpin> Body for Recorded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(timing) = self.timing.take()
        {
            timing.finish(status_of(trailers).unwrap_or(Code::Unknown));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        if let Some(timing) = self.timing.take() {
            timing.finish(Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_read_from_grpc_status() {
        let mut headers = HeaderMap::new();
        assert_eq!(status_of(&headers), None);
        headers.insert("grpc-status", "8".parse().expect("header"));
        assert_eq!(status_of(&headers), Some(Code::ResourceExhausted));
    }
}
