//! Streaming helpers: requests with ids, and IngestStream with resends, as a careful client
//! does it.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use sluice::proto::IngestRequest;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use uuid::Uuid;

use super::{TestServer, event};

/// Requests of one stream, with their events, so that unacknowledged ones can be resent as is.
pub fn requests(count: usize, size: usize, tag: &str) -> Vec<IngestRequest> {
    (0..count)
        .map(|sequence| IngestRequest {
            events: (0..size)
                .map(|offset| event("delivery", &format!("{tag} {sequence}-{offset}")))
                .collect(),
            sequence: sequence as u64,
        })
        .collect()
}

/// Broker `requests` over IngestStream with up to `window` in flight, waiting `pace` between
/// sends. Resends refused sequences after their retry delay. Calls `on_ack` with the number of
/// acknowledged requests so far, and stops when it returns false or the stream breaks. Returns
/// the sequences acknowledged as durable.
pub async fn stream_until(
    server: &TestServer,
    requests: &[IngestRequest],
    window: usize,
    pace: Duration,
    mut on_ack: impl FnMut(usize) -> bool,
) -> HashSet<u64> {
    let mut client = server.ingest_client().await;
    let (sender, receiver) = mpsc::channel(window);
    let mut acks = match client.ingest_stream(ReceiverStream::new(receiver)).await {
        Ok(response) => response.into_inner(),
        Err(_) => return HashSet::new(),
    };
    let mut acked = HashSet::new();
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut next = 0;
    let mut retry_queue: Vec<u64> = Vec::new();
    loop {
        while pending.len() < window {
            let sequence = match retry_queue.pop() {
                Some(sequence) => sequence,
                None if next < requests.len() => {
                    next += 1;
                    (next - 1) as u64
                }
                None => break,
            };
            pending.insert(sequence, Instant::now());
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            if sender
                .send(requests[sequence as usize].clone())
                .await
                .is_err()
            {
                return acked;
            }
        }
        if pending.is_empty() {
            return acked;
        }
        let Ok(Some(Ok(ack))) = tokio::time::timeout(Duration::from_secs(30), acks.next()).await
        else {
            return acked;
        };
        pending.remove(&ack.sequence);
        if ack.code == 0 {
            acked.insert(ack.sequence);
            if !on_ack(acked.len()) {
                return acked;
            }
        } else {
            let delay = ack
                .retry_after
                .and_then(|delay| Duration::try_from(delay).ok())
                .unwrap_or(Duration::from_millis(200));
            tokio::time::sleep(delay).await;
            retry_queue.push(ack.sequence);
        }
    }
}

pub fn ids_of<'a>(requests: impl IntoIterator<Item = &'a IngestRequest>) -> HashSet<Uuid> {
    requests
        .into_iter()
        .flat_map(|request| request.events.iter())
        .map(|event| Uuid::parse_str(&event.id).expect("uuid"))
        .collect()
}
