//! The native load: `IngestStream`s over N mTLS connections, each keeping a window of
//! requests in flight, with refused requests sent again after the delay the server names; and
//! the report both loads print.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::{SeedableRng, rngs::StdRng};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{client::Grpc, codegen::http::uri::PathAndQuery, transport::Channel};

use super::{
    BenchArgs, BenchError,
    encoded::{PreEncoded, encode_all},
    own_cpu, own_cpu_since, sample_event,
};
use sluice::proto::{IngestAck, IngestRequest};

const INGEST_STREAM: &str = "/sluice.v1.IngestService/IngestStream";

pub(super) struct LoadReport {
    pub(super) events: u64,
    pub(super) elapsed: Duration,
    pub(super) latency: Histogram<u64>,
    pub(super) refusals: u64,
    /// This process's own CPU over the load (user + system, seconds), when readable.
    pub(super) client_cpu: Option<f64>,
}

impl LoadReport {
    pub(super) fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub(super) fn print(&self, label: &str) {
        println!(
            "{label} {:.0} events/s committed ({} events in {:.2} s, {} refusals retried)",
            self.rate(),
            self.events,
            self.elapsed.as_secs_f64(),
            self.refusals
        );
        let at = |quantile: f64| Duration::from_micros(self.latency.value_at_quantile(quantile));
        println!(
            "ack latency:      p50 {:?}  p95 {:?}  p99 {:?}  max {:?}",
            at(0.50),
            at(0.95),
            at(0.99),
            Duration::from_micros(self.latency.max())
        );
        if let Some(seconds) = self.client_cpu.filter(|_| self.events > 0) {
            println!(
                "client CPU:       {:.2} µs per event (this load generator, {seconds:.2} s over the load)",
                seconds * 1e6 / self.events as f64
            );
        }
    }
}

/// The requests of each stream, generated before timing starts.
pub(super) fn workload(args: &BenchArgs) -> Vec<Vec<IngestRequest>> {
    let per_stream = args.events / args.streams.max(1);
    (0..args.streams.max(1))
        .map(|stream_index| {
            let mut rng = StdRng::seed_from_u64(1_000 + stream_index as u64);
            let mut produced = 0;
            let mut requests = Vec::new();
            while produced < per_stream {
                let count = args.batch.min(per_stream - produced);
                let events = (0..count)
                    .map(|offset| sample_event(&mut rng, produced + offset, args.ids))
                    .collect();
                requests.push(IngestRequest {
                    events,
                    sequence: requests.len() as u64,
                });
                produced += count;
            }
            requests
        })
        .collect()
}

/// Ack latencies of a load, in microseconds (1 µs to 10 minutes, 3 significant digits).
pub(super) fn latency_histogram() -> Result<Arc<Mutex<Histogram<u64>>>, BenchError> {
    Ok(Arc::new(Mutex::new(Histogram::new_with_bounds(
        1,
        600_000_000,
        3,
    )?)))
}

pub(super) async fn grpc_load(
    args: &BenchArgs,
    workload: &[Vec<IngestRequest>],
) -> Result<LoadReport, BenchError> {
    let addrs: Vec<&String> = std::iter::once(&args.connect.addr)
        .chain(&args.extra_addrs)
        .collect();
    let mut streams = Vec::with_capacity(workload.len());
    for (index, (requests, encoded)) in workload.iter().zip(encode_all(workload)).enumerate() {
        let sequences = requests.iter().map(|request| request.sequence);
        let requests: Vec<(u64, Bytes)> = sequences.zip(encoded).collect();
        streams.push((connect(args, addrs[index % addrs.len()]).await?, requests));
    }
    let latency = latency_histogram()?;
    let cpu_before = own_cpu();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (grpc, requests) in streams {
        let latency = latency.clone();
        let window = args.window.max(1);
        tasks.spawn(async move { drive_stream(grpc, requests, window, latency).await });
    }
    let mut events = 0;
    let mut refusals = 0;
    while let Some(result) = tasks.join_next().await {
        let (stored, refused) = result??;
        events += stored;
        refusals += refused;
    }
    let elapsed = started.elapsed();
    let client_cpu = own_cpu_since(cpu_before);
    let latency = latency.lock().await.clone();
    Ok(LoadReport {
        events,
        elapsed,
        latency,
        refusals,
        client_cpu,
    })
}

/// Sends `requests` (each a sequence and its encoded request) over one IngestStream with
/// `window` requests in flight; resends a sequence the server refused after its retry delay.
/// Returns (stored, refusals).
async fn drive_stream(
    mut grpc: Grpc<Channel>,
    requests: Vec<(u64, Bytes)>,
    window: usize,
    latency: Arc<Mutex<Histogram<u64>>>,
) -> Result<(u64, u64), BenchError> {
    let (sender, request_stream) = mpsc::channel::<Bytes>(window);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(format!("connection not ready: {error}")))?;
    let mut acks = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(request_stream)),
            PathAndQuery::from_static(INGEST_STREAM),
            PreEncoded::<IngestAck>::default(),
        )
        .await?
        .into_inner();
    let mut in_flight: HashMap<u64, (Instant, usize)> = HashMap::new();
    let mut next = 0usize;
    let mut stored = 0u64;
    let mut refusals = 0u64;
    let closed = || BenchError::Rpc(tonic::Status::aborted("request stream closed"));
    loop {
        while in_flight.len() < window && next < requests.len() {
            let (sequence, request) = &requests[next];
            in_flight.insert(*sequence, (Instant::now(), next));
            sender.send(request.clone()).await.map_err(|_| closed())?;
            next += 1;
        }
        if in_flight.is_empty() {
            break;
        }
        let Some(ack) = acks.next().await else {
            return Err(BenchError::Rpc(tonic::Status::aborted(
                "server ended the ack stream early",
            )));
        };
        let ack = ack?;
        let Some((sent_at, position)) = in_flight.remove(&ack.sequence) else {
            continue;
        };
        if ack.code != 0 {
            refusals += 1;
            let delay = ack
                .retry_after
                .and_then(|delay| Duration::try_from(delay).ok())
                .unwrap_or(Duration::from_millis(100));
            tokio::time::sleep(delay).await;
            in_flight.insert(ack.sequence, (Instant::now(), position));
            sender
                .send(requests[position].1.clone())
                .await
                .map_err(|_| closed())?;
            continue;
        }
        stored += ack.accepted;
        latency
            .lock()
            .await
            .saturating_record((sent_at.elapsed().as_micros() as u64).max(1));
    }
    drop(sender);
    while acks.next().await.is_some() {}
    Ok((stored, refusals))
}

async fn connect(args: &BenchArgs, addr: &str) -> Result<Grpc<Channel>, BenchError> {
    let connect = crate::cli::connect::ConnectArgs {
        addr: addr.to_owned(),
        ..args.connect.clone()
    };
    let channel = connect.channel().await?;
    Ok(Grpc::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}
