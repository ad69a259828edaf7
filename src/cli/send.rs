//! `sluice send [FILE|-]`: NDJSON events (one per line, the `Export` line format) streamed over
//! `IngestStream` with a window of requests in flight. Ids are made client-side when missing,
//! so every resend is exactly-once. Refused requests (buffer full, rate limited) are resent
//! after their `retry_after`; a broken stream is reopened and every unacknowledged request
//! resent. Invalid lines and rejected events go to `--rejects`, and make the exit code 2.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, IsTerminal, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value as Json, json};
use sluice::proto::{
    Event, IngestAck, IngestRequest, Metadata, ingest_service_client::IngestServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Code;

use super::{
    connect::{ConnectArgs, ConnectError},
    read::event_json,
};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot read {path}: {source}")]
    Input {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the rejects file {path}: {source}")]
    Rejects {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the server refused the stream: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("gave up after {0} reconnections")]
    GaveUp(u32),
}

#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// NDJSON file of events, or `-` (the default) for stdin.
    #[arg(default_value = "-")]
    pub file: String,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Where to write invalid lines and rejected events (NDJSON), to fix and resend.
    #[arg(long)]
    pub rejects: Option<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// What a send did; printed as JSON on stdout at the end.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub lines: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub invalid_lines: u64,
    /// Requests resent after a refusal or a broken stream.
    pub resent: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

impl Summary {
    /// 0 when every line was stored, 2 when some were invalid or rejected.
    pub fn exit_code(&self) -> u8 {
        if self.rejected + self.invalid_lines > 0 {
            2
        } else {
            0
        }
    }
}

/// One request's events and where each came from.
#[derive(Clone)]
struct Batch {
    events: Vec<Event>,
    lines: Vec<u64>,
}

/// Consecutive stream reconnections tried before giving up, and the pause that grows with each.
const MAX_RECONNECTS: u32 = 10;
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Parses one NDJSON line into an event: `service` and `message` required, `id` made when
/// missing, `timestamp` (RFC 3339) now when missing, `user_id` and `metadata` optional.
pub fn parse_event(line: &str, now: DateTime<Utc>) -> Result<Event, String> {
    let value: Json = serde_json::from_str(line).map_err(|error| format!("not JSON: {error}"))?;
    let Json::Object(mut object) = value else {
        return Err("not a JSON object".to_owned());
    };
    let text = |object: &mut Map<String, Json>, key: &str| -> Result<String, String> {
        match object.remove(key) {
            None | Some(Json::Null) => Ok(String::new()),
            Some(Json::String(text)) => Ok(text),
            Some(_) => Err(format!("{key} must be a string")),
        }
    };
    let id = match text(&mut object, "id")? {
        id if id.is_empty() => uuid::Uuid::now_v7().to_string(),
        id => id,
    };
    let timestamp = match text(&mut object, "timestamp")? {
        at if at.is_empty() => now,
        at => DateTime::parse_from_rfc3339(&at)
            .map_err(|error| format!("timestamp {at:?} is not RFC 3339: {error}"))?
            .with_timezone(&Utc),
    };
    let metadata: Option<Metadata> = match object.remove("metadata") {
        None | Some(Json::Null) => None,
        Some(Json::Object(fields)) => Some(fields.into()),
        Some(_) => return Err("metadata must be a JSON object".to_owned()),
    };
    Ok(Event {
        id,
        service: text(&mut object, "service")?,
        message: text(&mut object, "message")?,
        timestamp: Some(prost_types::Timestamp {
            seconds: timestamp.timestamp(),
            nanos: timestamp.timestamp_subsec_nanos() as i32,
        }),
        user_id: text(&mut object, "user_id")?,
        metadata,
        ingested_at: None,
        trace_id: String::new(),
    })
}

/// Reads batches of events from the input, reporting invalid lines as it goes.
struct Reader {
    lines: std::io::Lines<Box<dyn BufRead + Send>>,
    number: u64,
    batch: usize,
}

impl Reader {
    fn open(file: &str, batch: usize) -> Result<Self, SendError> {
        let input: Box<dyn BufRead + Send> = if file == "-" {
            Box::new(BufReader::new(std::io::stdin()))
        } else {
            let opened = std::fs::File::open(file).map_err(|source| SendError::Input {
                path: file.to_owned(),
                source,
            })?;
            Box::new(BufReader::new(opened))
        };
        Ok(Self {
            lines: input.lines(),
            number: 0,
            batch: batch.max(1),
        })
    }

    /// The next batch (None at the end); invalid lines go to `invalid`.
    fn next_batch(
        &mut self,
        invalid: &mut dyn FnMut(u64, &str, String),
    ) -> Result<Option<Batch>, std::io::Error> {
        let mut batch = Batch {
            events: Vec::new(),
            lines: Vec::new(),
        };
        let now = Utc::now();
        while batch.events.len() < self.batch {
            let Some(line) = self.lines.next() else {
                break;
            };
            let line = line?;
            self.number += 1;
            if line.trim().is_empty() {
                continue;
            }
            match parse_event(&line, now) {
                Ok(event) => {
                    batch.events.push(event);
                    batch.lines.push(self.number);
                }
                Err(reason) => invalid(self.number, &line, reason),
            }
        }
        Ok((!batch.events.is_empty()).then_some(batch))
    }
}

/// Where rejected events and invalid lines go.
struct Rejects {
    file: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl Rejects {
    fn open(path: Option<&PathBuf>) -> Result<Self, SendError> {
        let file = path
            .map(|path| {
                std::fs::File::create(path)
                    .map(|file| (path.clone(), std::io::BufWriter::new(file)))
                    .map_err(|source| SendError::Rejects {
                        path: path.clone(),
                        source,
                    })
            })
            .transpose()?;
        Ok(Self { file })
    }

    fn write(&mut self, record: Json) -> Result<(), SendError> {
        if let Some((path, file)) = &mut self.file {
            writeln!(file, "{record}").map_err(|source| SendError::Rejects {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SendError> {
        if let Some((path, file)) = &mut self.file {
            file.flush().map_err(|source| SendError::Rejects {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Sends the input; returns the summary (also when events were rejected).
pub async fn run(args: SendArgs) -> Result<Summary, SendError> {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut reader = Reader::open(&args.file, args.batch)?;
    let mut rejects = Rejects::open(args.rejects.as_ref())?;
    // indicatif draws nothing when stderr is not a terminal.
    let bar = if std::io::stderr().is_terminal() {
        progress_bar()
    } else {
        ProgressBar::hidden()
    };
    let mut client = IngestServiceClient::new(args.connect.channel().await?);
    // Unacknowledged requests by sequence: resent whole when a stream breaks.
    let mut pending: HashMap<u64, Batch> = HashMap::new();
    let mut next_sequence = 0u64;
    let mut input_done = false;
    let mut reconnects = 0;
    let mut invalid_records = Vec::new();
    // Resends scheduled after a refusal arrive here once their delay has passed; `waiting`
    // counts them as in flight meanwhile.
    let (resend, mut due) = mpsc::unbounded_channel::<Batch>();
    let mut waiting = 0usize;
    // The server's credit (`IngestAck.credit_events`): unacknowledged events stay within it,
    // so that the sender slows down before it is refused. None from a server that gives none.
    let mut credit: Option<u64> = None;
    'streams: loop {
        let (requests, receiver) = mpsc::channel::<IngestRequest>(args.window.max(1) * 2);
        let mut acks = match client
            .ingest_stream(args.connect.request(ReceiverStream::new(receiver))?)
            .await
        {
            Ok(acks) => acks.into_inner(),
            // The server is restarting or busy: try again, with a growing pause.
            Err(status) if retryable(status.code()) && reconnects < MAX_RECONNECTS => {
                reconnects += 1;
                tokio::time::sleep(retry_delay(&status).max(RECONNECT_PAUSE * reconnects)).await;
                continue 'streams;
            }
            Err(status) => return Err(status.into()),
        };
        // A new stream: everything unacknowledged goes again, under new sequences.
        let unacknowledged: Vec<Batch> = pending.drain().map(|(_, batch)| batch).collect();
        for batch in unacknowledged {
            summary.resent += 1;
            send(&requests, &mut pending, &mut next_sequence, batch).await;
        }
        loop {
            while !input_done
                && pending.len() + waiting < args.window.max(1)
                && within_credit(credit, &pending, args.batch)
            {
                let mut report_invalid = |number: u64, line: &str, reason: String| {
                    invalid_records.push(
                        json!({"line": number, "text": line, "field": "line", "reason": reason}),
                    );
                };
                match reader.next_batch(&mut report_invalid) {
                    Ok(Some(batch)) => {
                        summary.lines += batch.events.len() as u64;
                        send(&requests, &mut pending, &mut next_sequence, batch).await;
                    }
                    Ok(None) => input_done = true,
                    Err(source) => {
                        return Err(SendError::Input {
                            path: args.file.clone(),
                            source,
                        });
                    }
                }
            }
            for record in invalid_records.drain(..) {
                summary.invalid_lines += 1;
                summary.lines += 1;
                eprintln!(
                    "sluice send: line {}: {}",
                    record["line"],
                    record["reason"].as_str().unwrap_or_default()
                );
                rejects.write(record)?;
            }
            if input_done && pending.is_empty() && waiting == 0 {
                break 'streams;
            }
            let ack: IngestAck = tokio::select! {
                Some(batch) = due.recv() => {
                    waiting -= 1;
                    summary.resent += 1;
                    send(&requests, &mut pending, &mut next_sequence, batch).await;
                    continue;
                }
                ack = acks.next() => match ack {
                    Some(Ok(ack)) => {
                        // Progress: only consecutive failures count against the limit.
                        reconnects = 0;
                        ack
                    }
                    Some(Err(status)) if retryable(status.code()) && reconnects < MAX_RECONNECTS => {
                        reconnects += 1;
                        tokio::time::sleep(retry_delay(&status)).await;
                        continue 'streams;
                    }
                    Some(Err(status)) => return Err(status.into()),
                    None if reconnects < MAX_RECONNECTS => {
                        reconnects += 1;
                        tokio::time::sleep(RECONNECT_PAUSE * reconnects).await;
                        continue 'streams;
                    }
                    None => return Err(SendError::GaveUp(reconnects)),
                },
            };
            let Some(batch) = pending.remove(&ack.sequence) else {
                continue;
            };
            if ack.code != 0 && !retryable(Code::from_i32(ack.code)) {
                // Refused for good (too large, not allowed): every event of it is rejected.
                summary.rejected += batch.events.len() as u64;
                bar.inc(batch.events.len() as u64);
                eprintln!("sluice send: a request was refused: {}", ack.message);
                for (event, line) in batch.events.iter().zip(&batch.lines) {
                    rejects.write(json!({
                        "line": line,
                        "event": event_json(event),
                        "field": "request",
                        "reason": ack.message,
                    }))?;
                }
                continue;
            }
            if ack.code != 0 {
                // Refused whole (buffer full, rate limited): resend after the delay it names.
                let delay = ack
                    .retry_after
                    .and_then(|delay| Duration::try_from(delay).ok())
                    .unwrap_or(Duration::from_millis(200));
                let resend = resend.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = resend.send(batch);
                });
                waiting += 1;
                continue;
            }
            if ack.credit_events.is_some() {
                credit = ack.credit_events;
            }
            summary.accepted += ack.accepted;
            summary.rejected += ack.rejected;
            bar.inc(ack.accepted + ack.rejected);
            bar.set_message(format!(
                "{} stored, {} rejected",
                summary.accepted, summary.rejected
            ));
            for rejection in &ack.rejections {
                let index = rejection.index as usize;
                rejects.write(json!({
                    "line": batch.lines.get(index),
                    "event": batch.events.get(index).map(event_json),
                    "field": rejection.field,
                    "reason": rejection.reason,
                }))?;
            }
            let unreported = ack.rejected.saturating_sub(ack.rejections.len() as u64);
            if unreported > 0 {
                // The server details the first `validation.max_reported_rejections` only.
                rejects.write(json!({
                    "field": "request",
                    "reason": format!("{unreported} more events of this request were rejected without detail"),
                    "lines": batch.lines,
                }))?;
            }
        }
    }
    drop(client);
    rejects.finish()?;
    bar.finish_and_clear();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.events_per_second = summary.accepted as f64 / summary.seconds.max(1e-9);
    eprintln!(
        "sluice send: {} stored, {} rejected, {} invalid lines, {} resent requests in {:.1} s ({:.0} events/s)",
        summary.accepted,
        summary.rejected,
        summary.invalid_lines,
        summary.resent,
        summary.seconds,
        summary.events_per_second
    );
    Ok(summary)
}

/// Whether another request of `batch` events keeps the unacknowledged ones within `credit`.
/// One request is always allowed in flight, or a credit below a batch would stall the sender.
fn within_credit(credit: Option<u64>, pending: &HashMap<u64, Batch>, batch: usize) -> bool {
    let Some(credit) = credit else {
        return true;
    };
    let in_flight: usize = pending.values().map(|batch| batch.events.len()).sum();
    in_flight == 0 || (in_flight + batch) as u64 <= credit
}

async fn send(
    requests: &mpsc::Sender<IngestRequest>,
    pending: &mut HashMap<u64, Batch>,
    next_sequence: &mut u64,
    batch: Batch,
) {
    let sequence = *next_sequence;
    *next_sequence += 1;
    let request = IngestRequest {
        events: batch.events.clone(),
        sequence,
    };
    pending.insert(sequence, batch);
    // A closed stream shows up as the end of the acks, which reopens it and resends.
    let _ = requests.send(request).await;
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted
    )
}

/// The status's RetryInfo delay, else a short pause.
fn retry_delay(status: &tonic::Status) -> Duration {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .retry_info()
        .and_then(|retry| retry.retry_delay)
        .unwrap_or(Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_events_with_ids_and_timestamps_filled_in() {
        let now = Utc::now();
        let event = parse_event(
            r#"{"service":"web","message":"hi","metadata":{"a":1}}"#,
            now,
        )
        .expect("event");
        assert_eq!(
            (event.service.as_str(), event.message.as_str()),
            ("web", "hi")
        );
        assert!(uuid::Uuid::try_parse(&event.id).is_ok());
        assert_eq!(event.timestamp.map(|at| at.seconds), Some(now.timestamp()));
        // The Export line format reads back (ingested_at is ignored).
        let exported = r#"{"id":"0195f3c2-7a3b-7c1e-9f00-000000000001","service":"s","message":"m","timestamp":"2026-11-20T10:00:00.5+00:00","ingested_at":"2026-11-20T10:00:01+00:00","user_id":"u","metadata":{}}"#;
        let event = parse_event(exported, now).expect("export line");
        assert_eq!(event.user_id, "u");
        assert_eq!(event.timestamp.map(|at| at.nanos), Some(500_000_000));
        assert!(parse_event("{not json", now).is_err());
        assert!(parse_event(r#"{"service":1}"#, now).is_err());
        assert!(
            parse_event(
                r#"{"service":"s","message":"m","timestamp":"yesterday"}"#,
                now
            )
            .is_err()
        );
    }
}
