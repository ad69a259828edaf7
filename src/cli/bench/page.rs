//! `sluice bench-query --page-service`: Query pages of many events with large metadata, the
//! case where encoding the reply, not reading the rows, is most of the work.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sluice::proto::{QueryRequest, query_service_client::QueryServiceClient};
use tonic::transport::Channel;

use super::{BenchError, cpu_seconds};

/// Asks `iterations` times for the newest `limit` events of `service` and prints the latency
/// percentiles, the reply's size and the server's CPU per page and per event.
pub async fn pages(
    client: &mut QueryServiceClient<Channel>,
    service: &str,
    limit: u32,
    iterations: usize,
    server_pid: Option<u32>,
) -> Result<(), BenchError> {
    let request = QueryRequest {
        services: vec![service.to_owned()],
        limit,
        ..QueryRequest::default()
    };
    // One call first: connections, plans and caches warm, and the page's shape known.
    let first = client.query(request.clone()).await?.into_inner();
    let events = first.events.len();
    let metadata_bytes: usize = first
        .events
        .iter()
        .map(|event| {
            event
                .metadata
                .as_ref()
                .map_or(0, |metadata| metadata.json_len())
        })
        .sum();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let cpu_before = server_pid.and_then(cpu_seconds);
    for _ in 0..iterations {
        let started = Instant::now();
        let page = client.query(request.clone()).await?.into_inner();
        latency.saturating_record((started.elapsed().as_micros() as u64).max(1));
        if page.events.len() != events {
            eprintln!(
                "a page held {} events, the first {events}",
                page.events.len()
            );
        }
    }
    let cpu = server_pid
        .and_then(cpu_seconds)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let at = |quantile: f64| Duration::from_micros(latency.value_at_quantile(quantile));
    println!(
        "page of {events} events of {service} ({:.1} KiB of metadata each): p50 {:?}  p95 {:?}  p99 {:?}  ({iterations} calls)",
        metadata_bytes as f64 / events.max(1) as f64 / 1024.0,
        at(0.5),
        at(0.95),
        at(0.99),
    );
    if let Some(cpu) = cpu {
        println!(
            "  server CPU: {:.2} ms per page, {:.2} µs per event",
            cpu * 1e3 / iterations as f64,
            cpu * 1e6 / (iterations * events.max(1)) as f64
        );
    }
    Ok(())
}
