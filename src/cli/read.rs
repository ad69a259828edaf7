//! `sluice query`, `sluice export`, `sluice delete` and `sluice stats`: the QueryService from a
//! shell. Filters are flags; times are RFC 3339 or a duration ago (`--since 1h`).

use std::{
    collections::HashSet,
    io::{BufWriter, IsTerminal, Write},
};

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value as Json, json};
use sluice::proto::{
    DeleteRequest, Event, ExportRequest, Metadata, Order, QueryRequest, ServiceFigures,
    StatsRequest, TailRequest, query_service_client::QueryServiceClient,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::connect::{ConnectArgs, ConnectError};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("not confirmed; nothing was deleted")]
    NotConfirmed,
}

/// The filters of Query, Export and Delete.
#[derive(Debug, Clone, clap::Args)]
pub struct FilterArgs {
    /// Only this service (repeat for several).
    #[arg(long = "service")]
    pub services: Vec<String>,
    /// Only events at or after this time: RFC 3339, or a duration ago (`90m`, `2days`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events before this time: RFC 3339, or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this user's events.
    #[arg(long)]
    pub user_id: Option<String>,
    /// Only events whose message contains this text.
    #[arg(long)]
    pub message_contains: Option<String>,
    /// Only events whose metadata contains this JSON object, e.g. '{"status":500}'.
    #[arg(long)]
    pub metadata: Option<String>,
}

struct Filters {
    services: Vec<String>,
    start: Option<prost_types::Timestamp>,
    end: Option<prost_types::Timestamp>,
    user_id: String,
    message_contains: String,
    metadata: Option<Metadata>,
}

fn parse_time(flag: &'static str, text: &str) -> Result<prost_types::Timestamp, ReadError> {
    let at = match DateTime::parse_from_rfc3339(text) {
        Ok(at) => at.with_timezone(&Utc),
        Err(_) => {
            let ago = humantime::parse_duration(text).map_err(|_| ReadError::Flag {
                flag,
                reason: format!("{text:?} is neither RFC 3339 nor a duration like 1h"),
            })?;
            Utc::now()
                - chrono::Duration::from_std(ago).map_err(|_| ReadError::Flag {
                    flag,
                    reason: "too far back".to_owned(),
                })?
        }
    };
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    })
}

impl FilterArgs {
    fn parse(&self) -> Result<Filters, ReadError> {
        let metadata = self
            .metadata
            .as_deref()
            .map(|text| match serde_json::from_str::<Json>(text) {
                Ok(Json::Object(fields)) => Ok(Metadata::from(fields)),
                _ => Err(ReadError::Flag {
                    flag: "--metadata",
                    reason: "must be a JSON object".to_owned(),
                }),
            })
            .transpose()?;
        Ok(Filters {
            services: self.services.clone(),
            start: self
                .since
                .as_deref()
                .map(|text| parse_time("--since", text))
                .transpose()?,
            end: self
                .until
                .as_deref()
                .map(|text| parse_time("--until", text))
                .transpose()?,
            user_id: self.user_id.clone().unwrap_or_default(),
            message_contains: self.message_contains.clone().unwrap_or_default(),
            metadata,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Events per page (at most 10,000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Oldest first (default: newest first).
    #[arg(long)]
    pub oldest_first: bool,
    /// Follow page tokens to the last page.
    #[arg(long)]
    pub all: bool,
    /// Only events brought by requests of this trace (32 hex digits, as in `traceparent`).
    #[arg(long)]
    pub trace_id: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Output file (`-`: stdout). Written as FILE.partial and renamed once complete, so an
    /// interrupted export never looks finished; run it again to resume: the events already in
    /// FILE.partial are kept and not written twice.
    #[arg(short, long, default_value = "-")]
    pub output: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Do not ask: delete what the dry run counted.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Only this service (repeat for several).
    #[arg(long = "service")]
    pub services: Vec<String>,
    /// Only this user's events.
    #[arg(long)]
    pub user_id: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// Top services to list.
    #[arg(long, default_value_t = 10)]
    pub top: u32,
    /// Start of the business figures' window: RFC 3339, or a duration ago (`7d`). Default:
    /// 24 hours before `--until`.
    #[arg(long)]
    pub since: Option<String>,
    /// End of the business figures' window (default: now).
    #[arg(long)]
    pub until: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

async fn client(connect: &ConnectArgs) -> Result<QueryServiceClient<Channel>, ReadError> {
    Ok(QueryServiceClient::new(connect.channel().await?).max_decoding_message_size(64 << 20))
}

fn rfc3339(at: Option<&prost_types::Timestamp>) -> Json {
    at.and_then(|at| DateTime::<Utc>::from_timestamp(at.seconds, at.nanos.max(0) as u32))
        .map_or(Json::Null, |at| Json::String(at.to_rfc3339()))
}

/// An event in the Export line format.
pub fn event_json(event: &Event) -> Json {
    json!({
        "id": event.id,
        "service": event.service,
        "message": event.message,
        "timestamp": rfc3339(event.timestamp.as_ref()),
        "ingested_at": rfc3339(event.ingested_at.as_ref()),
        "user_id": (!event.user_id.is_empty()).then_some(&event.user_id),
        "metadata": event.metadata.clone().map(|metadata| Json::Object(metadata.into_object())),
    })
}

fn write_error(path: &str) -> impl Fn(std::io::Error) -> ReadError + '_ {
    move |source| ReadError::Write {
        path: path.to_owned(),
        source,
    }
}

/// `sluice query`: a table on a terminal, NDJSON otherwise.
/// How many times `sluice query` asks a page again after ABORTED.
const ABORTED_RETRIES: u32 = 10;

pub async fn query(args: QueryArgs) -> Result<(), ReadError> {
    let filters = args.filters.parse()?;
    let mut client = client(&args.connect).await?;
    let table = std::io::stdout().is_terminal();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if table {
        writeln!(
            out,
            "{:<32}  {:<20}  {:<20}  MESSAGE",
            "TIMESTAMP", "SERVICE", "USER"
        )
        .map_err(write_error("stdout"))?;
    }
    let mut page_token = String::new();
    let mut shown = 0usize;
    loop {
        let request = QueryRequest {
            services: filters.services.clone(),
            start_time: filters.start,
            end_time: filters.end,
            user_id: filters.user_id.clone(),
            metadata_contains: filters.metadata.clone(),
            message_contains: filters.message_contains.clone(),
            order: if args.oldest_first {
                Order::OldestFirst
            } else {
                Order::NewestFirst
            } as i32,
            limit: args.limit,
            page_token,
            trace_id: args.trace_id.clone().unwrap_or_default(),
        };
        // ABORTED: the archive moved under the call (the lifecycle job at work); the same
        // page is asked again, a few times.
        let mut aborted = 0;
        let page = loop {
            match client.query(args.connect.request(request.clone())?).await {
                Err(status)
                    if status.code() == tonic::Code::Aborted && aborted < ABORTED_RETRIES =>
                {
                    aborted += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                answer => break answer?.into_inner(),
            }
        };
        for event in &page.events {
            writeln!(out, "{}", event_line(event, table)).map_err(write_error("stdout"))?;
        }
        shown += page.events.len();
        // A bounded scan may answer with a partial (even empty) page and a token: without
        // --all, follow tokens until a page's worth is shown.
        if page.next_page_token.is_empty() || (!args.all && shown >= args.limit as usize) {
            break;
        }
        page_token = page.next_page_token;
    }
    out.flush().map_err(write_error("stdout"))
}

/// One event as a line: a table row on a terminal, else its Export line.
fn event_line(event: &Event, table: bool) -> String {
    if !table {
        return event_json(event).to_string();
    }
    let at = rfc3339(event.timestamp.as_ref());
    format!(
        "{:<32}  {:<20}  {:<20}  {}",
        at.as_str().unwrap_or_default(),
        event.service,
        event.user_id,
        event.message.replace('\n', " ")
    )
}

/// `sluice tail`: follows new events until interrupted.
pub async fn tail(args: TailArgs) -> Result<(), ReadError> {
    let mut client = client(&args.connect).await?;
    let request = TailRequest {
        services: args.services.clone(),
        user_id: args.user_id.clone().unwrap_or_default(),
    };
    let mut stream = client
        .tail(args.connect.request(request)?)
        .await?
        .into_inner();
    let table = std::io::stdout().is_terminal();
    while let Some(response) = stream.next().await {
        let response = response?;
        if response.missed_batches > 0 {
            eprintln!(
                "sluice tail: fell behind, skipped {} batches",
                response.missed_batches
            );
        }
        let mut out = std::io::stdout().lock();
        for event in &response.events {
            writeln!(out, "{}", event_line(event, table)).map_err(write_error("stdout"))?;
        }
        out.flush().map_err(write_error("stdout"))?;
    }
    Ok(())
}

/// `sluice export`: every matching event, with a progress bar sized from `total_events`.
pub async fn export(args: ExportArgs) -> Result<u64, ReadError> {
    let filters = args.filters.parse()?;
    let mut client = client(&args.connect).await?;
    let request = ExportRequest {
        services: filters.services,
        start_time: filters.start,
        end_time: filters.end,
        user_id: filters.user_id,
        metadata_contains: filters.metadata,
        message_contains: filters.message_contains,
    };
    let mut chunks = client
        .export(args.connect.request(request)?)
        .await?
        .into_inner();
    let to_file = args.output != "-";
    let partial = format!("{}.partial", args.output);
    // An interrupted export left FILE.partial: keep its complete lines and add only the
    // events it lacks.
    let written = if to_file {
        resume(&partial).map_err(write_error(&partial))?
    } else {
        HashSet::new()
    };
    if !written.is_empty() {
        eprintln!(
            "sluice export: resuming {partial}: {} events already there",
            written.len()
        );
    }
    let mut out: Box<dyn Write> = if to_file {
        Box::new(BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&partial)
                .map_err(write_error(&partial))?,
        ))
    } else {
        Box::new(BufWriter::new(std::io::stdout()))
    };
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events ({per_sec}, {eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut events = 0u64;
    let mut finished = false;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if chunk.total_events > 0 {
            bar.set_length(chunk.total_events);
        }
        if written.is_empty() {
            out.write_all(&chunk.ndjson)
                .map_err(write_error(&partial))?;
        } else {
            for line in chunk.ndjson.split_inclusive(|byte| *byte == b'\n') {
                if line_id(line).is_none_or(|id| !written.contains(&id)) {
                    out.write_all(line).map_err(write_error(&partial))?;
                }
            }
        }
        events += chunk.events;
        bar.set_position(events);
        finished |= chunk.last;
    }
    bar.finish_and_clear();
    if !finished {
        return Err(ReadError::Rpc(tonic::Status::unavailable(
            "the export ended before its last chunk; run it again",
        )));
    }
    out.flush().map_err(write_error(&partial))?;
    drop(out);
    if to_file {
        std::fs::File::open(&partial)
            .and_then(|file| file.sync_all())
            .and_then(|()| std::fs::rename(&partial, &args.output))
            .map_err(write_error(&args.output))?;
    }
    eprintln!("sluice export: {events} events");
    Ok(events)
}

/// The id of an NDJSON event line.
fn line_id(line: &[u8]) -> Option<uuid::Uuid> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: uuid::Uuid,
    }
    serde_json::from_slice::<Id>(line)
        .ok()
        .map(|event| event.id)
}

/// The ids of a partial export's complete lines; a torn last line (the interruption) is cut.
fn resume(partial: &str) -> std::io::Result<HashSet<uuid::Uuid>> {
    let bytes = match std::fs::read(partial) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(error) => return Err(error),
    };
    let complete = bytes
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |end| end + 1);
    if complete < bytes.len() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(partial)?
            .set_len(complete as u64)?;
    }
    Ok(bytes[..complete]
        .split(|byte| *byte == b'\n')
        .filter_map(line_id)
        .collect())
}

/// `sluice delete`: the dry run's counts, a confirmation (unless `--yes`), then the delete.
pub async fn delete(args: DeleteArgs) -> Result<(), ReadError> {
    let filters = args.filters.parse()?;
    let mut client = client(&args.connect).await?;
    let request = |dry_run| DeleteRequest {
        user_id: filters.user_id.clone(),
        services: filters.services.clone(),
        start_time: filters.start,
        end_time: filters.end,
        dry_run,
    };
    let counted = client
        .delete(args.connect.request(request(true))?)
        .await?
        .into_inner();
    eprintln!(
        "would delete {} events, {} archived events, {} dead letters and {} spooled events",
        counted.deleted,
        counted.archived_deleted,
        counted.dead_letters_deleted,
        counted.spooled_deleted
    );
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(ReadError::NotConfirmed);
        }
        eprint!("delete them? type yes: ");
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .map_err(write_error("stdin"))?;
        if answer.trim() != "yes" {
            return Err(ReadError::NotConfirmed);
        }
    }
    let done = client
        .delete(args.connect.request(request(false))?)
        .await?
        .into_inner();
    println!(
        "{}",
        json!({
            "deleted": done.deleted,
            "archived_deleted": done.archived_deleted,
            "dead_letters_deleted": done.dead_letters_deleted,
            "spooled_deleted": done.spooled_deleted,
        })
    );
    Ok(())
}

/// `sluice stats`: a readable summary.
pub async fn stats(args: StatsArgs) -> Result<(), ReadError> {
    let mut client = client(&args.connect).await?;
    let stats = client
        .stats(
            args.connect.request(StatsRequest {
                top_n: args.top,
                trend_hours: 24,
                start_time: args
                    .since
                    .as_deref()
                    .map(|text| parse_time("--since", text))
                    .transpose()?,
                end_time: args
                    .until
                    .as_deref()
                    .map(|text| parse_time("--until", text))
                    .transpose()?,
            })?,
        )
        .await?
        .into_inner();
    let mut text = format!("events stored: {}\n", stats.total_events);
    if let Some(buffer) = &stats.buffer {
        text.push_str(&format!(
            "buffer: {}/{} events, {}/{} bytes\n",
            buffer.events, buffer.max_events, buffer.bytes, buffer.max_bytes
        ));
    }
    if let Some(writer) = &stats.writer {
        text.push_str(&format!(
            "writers: {}, circuit {}, database {}, spool {} bytes\n",
            writer.workers,
            writer.circuit,
            if writer.database_up { "up" } else { "down" },
            writer.spool_bytes
        ));
    }
    if let Some(ingest) = &stats.ingest {
        text.push_str(&format!(
            "since start: {} received, {} stored, {} duplicates, {} rejected, {} refused, {} spooled\n",
            ingest.received, ingest.stored, ingest.duplicates, ingest.rejected, ingest.refused, ingest.spooled
        ));
    }
    text.push_str("top services (last 24 h / total / archived):\n");
    for service in &stats.top_services {
        text.push_str(&format!(
            "  {:<24} {:>12} / {} / {}\n",
            service.service, service.last_24h, service.total, service.archived
        ));
    }
    text.push_str(&format!(
        "figures from {} to {}:\n  {:<24} {:>10} {:>9} {:>7} {:>24} {:>18} {:>22}\n",
        rfc3339(stats.figures_start.as_ref()),
        rfc3339(stats.figures_end.as_ref()),
        "SERVICE",
        "ACCEPTED",
        "REJECTED",
        "RATE",
        "ACK p50/p95/p99 ms",
        "PROCESS avg/max ms",
        "SIZE <1K/1-10K/>10K"
    ));
    let all = stats.all_services.iter().map(|all| ServiceFigures {
        service: "(all)".to_owned(),
        ..all.clone()
    });
    for figures in stats.figures.iter().cloned().chain(all) {
        text.push_str(&format!(
            "  {:<24} {:>10} {:>9} {:>6.2}% {:>24} {:>18} {:>22}\n",
            figures.service,
            figures.accepted,
            figures.rejected,
            figures.rejection_rate * 100.0,
            format!(
                "{:.1}/{:.1}/{:.1}",
                figures.ack_latency_p50_ms, figures.ack_latency_p95_ms, figures.ack_latency_p99_ms
            ),
            format!(
                "{:.1}/{:.1}",
                figures.processing_avg_ms, figures.processing_max_ms
            ),
            format!(
                "{}/{}/{}",
                figures.size_under_1kib, figures.size_1_to_10kib, figures.size_over_10kib
            ),
        ));
        for (reason, count) in &figures.rejected_by_reason {
            text.push_str(&format!("      rejected {reason}: {count}\n"));
        }
    }
    if let Some(usage) = &stats.usage {
        let row = |counts: &[u64]| {
            counts
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        text.push_str(&format!(
            "accepted by UTC hour (00..23): {}\naccepted by weekday (Mon..Sun): {}\n",
            row(&usage.by_hour_of_day),
            row(&usage.by_day_of_week)
        ));
    }
    print!("{text}");
    Ok(())
}
