//! `sluice bench`: a load generator for a running server.
//!
//! It opens N mTLS connections, each with one `IngestStream` keeping a window of requests in
//! flight, sends realistic ~250-byte events, and reports committed events/s and ack latency
//! percentiles. Given `--database-url`, it first times a raw binary COPY of the same kind of rows
//! into the same table over `--copy-connections` connections (the ceiling), and prints the ratio.
//! Given `--server-pid`, it reports the server's peak RSS.

mod answers;
mod ceiling;
mod encoded;
mod native;
mod otlp;
mod page;

use std::time::{Duration, Instant};

use chrono::Utc;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sqlx::Connection;
use tokio_stream::StreamExt;

use self::{
    ceiling::{FileCeilings, copy_ceiling, file_ceilings},
    native::{grpc_load, workload},
};
use super::connect::{ConnectArgs, ConnectError};
use uuid::Uuid;

use sluice::proto::Event;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("rpc failed: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("a sender task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Concurrent streams, each on its own connection.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Total events to send.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Requests in flight per stream.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Database to time the raw COPY ceiling against (the server's database).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Connections for the raw COPY ceiling.
    #[arg(long, default_value_t = 2)]
    pub copy_connections: usize,
    /// Rows per COPY (one transaction each) of the raw ceiling; default: `--batch`.
    #[arg(long)]
    pub ceiling_batch: Option<usize>,
    /// Also time PostgreSQL loading the same rows from files itself (server-side COPY, binary
    /// and text, `--copy-connections`, `--ceiling-batch` rows a file), and report the ratio to
    /// the better. Writes its files into the database's data directory: a throwaway database
    /// only (bench/run.sh uses it).
    #[arg(long, requires = "reset_table")]
    pub file_ceiling: bool,
    /// TRUNCATE `events` before each phase, so both start from an empty table. Destroys data:
    /// only for a throwaway database (bench/run.sh uses it).
    #[arg(long, requires = "database_url")]
    pub reset_table: bool,
    /// Send the whole workload a second time (same ids and timestamps) and report that rate:
    /// the idempotent path, where every event is a duplicate.
    #[arg(long)]
    pub duplicates: bool,
    /// Server process id, to report its peak RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// More ingest nodes (same certificates): streams are spread over `--addr` and these.
    #[arg(long = "extra-addr")]
    pub extra_addrs: Vec<String>,
    /// After the load, wait until every acknowledged event is in `events` and report that
    /// end-to-end rate too (Redis mode acknowledges once Redis has the events).
    #[arg(long, requires = "database_url")]
    pub wait_stored: bool,
    /// Event ids: `v7` (time-ordered, sent by the client), `v4` (random, sent by the client;
    /// the raw ceiling then copies v4 ids too) or `server` (none sent: the server assigns
    /// UUIDv7).
    #[arg(long, value_enum, default_value_t = IdKind::V7)]
    pub ids: IdKind,
    /// Tail streams to open (over ten connections) before the load and never read: what idle
    /// subscribers cost ingest.
    #[arg(long, default_value_t = 0)]
    pub idle_tails: usize,
    /// After the native load, send the same events again as OTLP logs (`LogsService/Export`,
    /// `--window` calls in flight per connection) and report that rate, its server CPU per
    /// event and its ratio to the native path's; then natively once more, events stored as the
    /// OTLP records are (their metadata under `attributes`, with severity and resource), and
    /// the ratios to that.
    #[arg(long)]
    pub otlp: bool,
}

/// Where event ids come from (`--ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdKind {
    V7,
    V4,
    Server,
}

impl IdKind {
    /// The id a client sends.
    fn sent(self) -> String {
        match self {
            Self::V7 => Uuid::now_v7().to_string(),
            Self::V4 => Uuid::new_v4().to_string(),
            Self::Server => String::new(),
        }
    }

    /// The id the stored row has.
    fn stored(self) -> Uuid {
        match self {
            Self::V4 => Uuid::new_v4(),
            Self::V7 | Self::Server => Uuid::now_v7(),
        }
    }
}

const SERVICES: [&str; 8] = [
    "checkout", "billing", "search", "auth", "catalog", "shipping", "email", "gateway",
];
const PATHS: [&str; 6] = [
    "/api/orders",
    "/api/cart",
    "/api/users/me",
    "/api/search",
    "/api/pay",
    "/health",
];

/// A realistic event of about 250 bytes when encoded.
fn sample_event(rng: &mut StdRng, sequence: usize, ids: IdKind) -> Event {
    use prost_types::{Struct, Value, value::Kind};
    let service = SERVICES[sequence % SERVICES.len()];
    let path = PATHS[rng.random_range(0..PATHS.len())];
    let status = [200.0, 200.0, 200.0, 201.0, 404.0, 500.0][rng.random_range(0..6)];
    let latency = rng.random_range(1..900) as f64;
    let user = format!("user-{}", rng.random_range(0..50_000));
    let text = |value: &str| Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    };
    let number = |value: f64| Value {
        kind: Some(Kind::NumberValue(value)),
    };
    let metadata = Struct {
        fields: [
            ("path".to_owned(), text(path)),
            ("status".to_owned(), number(status)),
            ("latencyMs".to_owned(), number(latency)),
            (
                "region".to_owned(),
                text(["eu-west-1", "us-east-1", "ap-south-1"][sequence % 3]),
            ),
        ]
        .into(),
    };
    let now = Utc::now();
    Event {
        id: ids.sent(),
        service: service.to_owned(),
        message: format!("{service} handled GET {path} -> {status} in {latency} ms"),
        timestamp: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: now.timestamp_subsec_nanos() as i32,
        }),
        user_id: user,
        metadata: Some(metadata.into()),
        ingested_at: None,
        trace_id: String::new(),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct QueryBenchArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Calls per scenario.
    #[arg(long, default_value_t = 300)]
    pub iterations: usize,
    /// Distinct services and users in the data set (bench/query.sh loads `svc-0…` and `user-0…`).
    #[arg(long, default_value_t = 8)]
    pub services: usize,
    #[arg(long, default_value_t = 50_000)]
    pub users: usize,
    /// Export this service's events, then every service's events of one whole day (from two
    /// days ago to one day ago), then the events of `user-4242`, and time each.
    #[arg(long)]
    pub export_service: Option<String>,
    /// Server process id, to report its RSS around the export.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Ask for this service's newest `--page-events` events, `--iterations` times, and
    /// report the latency and the server's CPU per page (bench/query_page.sh loads `wide`,
    /// events with 4 KiB of metadata).
    #[arg(long)]
    pub page_service: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub page_events: u32,
    /// Complete answers per search shape (every page until `limit` events or no token).
    #[arg(long, default_value_t = 10)]
    pub answers: usize,
    /// Most calls one complete answer may take before the bench gives up on it.
    #[arg(long, default_value_t = 400)]
    pub max_calls_per_answer: usize,
    /// A substring exactly one loaded message holds (bench/query.sh writes
    /// `GET /api/orders/<n> -> ...` for n from 1 to the row count).
    #[arg(long, default_value = "/orders/1234567 -> ")]
    pub unique_needle: String,
    /// Only the scenarios and shapes whose name contains one of these (repeatable; all when
    /// none is given), as in `--only "user"`.
    #[arg(long)]
    pub only: Vec<String>,
}

impl QueryBenchArgs {
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|part| name.contains(part.as_str()))
    }
}

/// Latency of the read-side calls on a loaded database, and Export throughput.
pub async fn run_queries(args: QueryBenchArgs) -> Result<(), BenchError> {
    use sluice::proto::{
        ExportRequest, QueryRequest, StatsRequest, query_service_client::QueryServiceClient,
    };
    let channel = args.connect.channel().await?;
    let mut client = QueryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let mut rng = StdRng::seed_from_u64(7);
    let now = Utc::now();
    let stamp = |at: chrono::DateTime<Utc>| {
        Some(prost_types::Timestamp {
            seconds: at.timestamp(),
            nanos: 0,
        })
    };
    let contains = |fields: serde_json::Value| -> Option<sluice::proto::Metadata> {
        match fields {
            serde_json::Value::Object(fields) => Some(fields.into()),
            _ => None,
        }
    };
    for scenario in [
        "service, 1-hour window",
        "one user_id",
        "next page",
        "stats",
        "rare message, all",
        "service + rare message",
        "metadata, no match",
        "metadata, a third",
        "user + metadata",
    ] {
        if !args.runs(scenario) {
            continue;
        }
        let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut returned = 0usize;
        for _ in 0..args.iterations {
            let service = format!("svc-{}", rng.random_range(0..args.services));
            let started = Instant::now();
            match scenario {
                "service, 1-hour window" => {
                    let end = now - chrono::Duration::hours(rng.random_range(1..24 * 28));
                    let request = QueryRequest {
                        services: vec![service],
                        start_time: stamp(end - chrono::Duration::hours(1)),
                        end_time: stamp(end),
                        ..QueryRequest::default()
                    };
                    returned += client.query(request).await?.into_inner().events.len();
                }
                "one user_id" => {
                    let request = QueryRequest {
                        user_id: format!("user-{}", rng.random_range(0..args.users)),
                        ..QueryRequest::default()
                    };
                    returned += client.query(request).await?.into_inner().events.len();
                }
                "next page" => {
                    let end = now - chrono::Duration::hours(rng.random_range(1..24 * 28));
                    let first = QueryRequest {
                        services: vec![service],
                        end_time: stamp(end),
                        ..QueryRequest::default()
                    };
                    let token = client
                        .query(first.clone())
                        .await?
                        .into_inner()
                        .next_page_token;
                    let started = Instant::now();
                    let page = client
                        .query(QueryRequest {
                            page_token: token,
                            ..first
                        })
                        .await?
                        .into_inner();
                    returned += page.events.len();
                    latency.saturating_record((started.elapsed().as_micros() as u64).max(1));
                    continue;
                }
                "rare message, all" | "service + rare message" => {
                    // A substring no loaded message holds: the worst case, a full scan.
                    let request = QueryRequest {
                        services: if scenario.starts_with("service") {
                            vec![service]
                        } else {
                            Vec::new()
                        },
                        message_contains: "-> 599 in".to_owned(),
                        limit: 10,
                        ..QueryRequest::default()
                    };
                    returned += client.query(request).await?.into_inner().events.len();
                }
                "metadata, no match" | "metadata, a third" | "user + metadata" => {
                    let (fields, user_id) = match scenario {
                        "metadata, no match" => (serde_json::json!({"status": 500}), String::new()),
                        "metadata, a third" => (serde_json::json!({"region": "eu"}), String::new()),
                        _ => (
                            serde_json::json!({"region": "eu"}),
                            format!("user-{}", rng.random_range(0..args.users)),
                        ),
                    };
                    let request = QueryRequest {
                        metadata_contains: contains(fields),
                        user_id,
                        limit: 10,
                        ..QueryRequest::default()
                    };
                    returned += client.query(request).await?.into_inner().events.len();
                }
                _ => {
                    returned += client
                        .stats(StatsRequest::default())
                        .await?
                        .into_inner()
                        .services
                        .len();
                }
            }
            latency.saturating_record((started.elapsed().as_micros() as u64).max(1));
        }
        let at = |quantile: f64| Duration::from_micros(latency.value_at_quantile(quantile));
        println!(
            "{scenario:<24} p50 {:>10?}  p95 {:>10?}  p99 {:>10?}  ({} calls, {} rows returned)",
            at(0.5),
            at(0.95),
            at(0.99),
            args.iterations,
            returned
        );
    }
    let search =
        |services: Vec<String>, message: &str, metadata: Option<serde_json::Value>| QueryRequest {
            services,
            message_contains: message.to_owned(),
            metadata_contains: metadata.and_then(contains),
            limit: 10,
            ..QueryRequest::default()
        };
    let shapes = vec![
        answers::Shape {
            name: "rare message, all",
            request: search(Vec::new(), &args.unique_needle, None),
        },
        answers::Shape {
            name: "service + rare message",
            request: search(vec!["svc-3".to_owned()], &args.unique_needle, None),
        },
        answers::Shape {
            name: "absent message, all",
            request: search(Vec::new(), "-> 599 in", None),
        },
        answers::Shape {
            name: "metadata, no match",
            request: search(Vec::new(), "", Some(serde_json::json!({"status": 500}))),
        },
        answers::Shape {
            name: "metadata, a third",
            request: search(Vec::new(), "", Some(serde_json::json!({"region": "eu"}))),
        },
    ]
    .into_iter()
    .filter(|shape| args.runs(shape.name))
    .collect::<Vec<_>>();
    if args.answers > 0 && !shapes.is_empty() {
        answers::run(&mut client, shapes, args.answers, args.max_calls_per_answer).await?;
    }
    if let Some(service) = &args.page_service {
        page::pages(
            &mut client,
            service,
            args.page_events,
            args.iterations,
            args.server_pid,
        )
        .await?;
    }
    if let Some(service) = &args.export_service {
        let day_ends = chrono::Utc::now() - chrono::Duration::days(1);
        let timestamp = |at: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
            seconds: at.timestamp(),
            nanos: 0,
        };
        let exports = [
            (
                format!("export of {service}"),
                ExportRequest {
                    services: vec![service.clone()],
                    ..ExportRequest::default()
                },
            ),
            (
                "export of a whole day".to_owned(),
                ExportRequest {
                    start_time: Some(timestamp(day_ends - chrono::Duration::days(1))),
                    end_time: Some(timestamp(day_ends)),
                    ..ExportRequest::default()
                },
            ),
            (
                "export of user-4242".to_owned(),
                ExportRequest {
                    user_id: "user-4242".to_owned(),
                    ..ExportRequest::default()
                },
            ),
        ];
        for (name, request) in exports {
            export_once(&mut client, &name, request, args.server_pid).await?;
        }
    }
    Ok(())
}

/// One Export, timed, with the server's RSS and CPU around it when its pid is known.
async fn export_once(
    client: &mut sluice::proto::query_service_client::QueryServiceClient<tonic::transport::Channel>,
    name: &str,
    request: sluice::proto::ExportRequest,
    server_pid: Option<u32>,
) -> Result<(), BenchError> {
    let rss_before = server_pid.and_then(current_rss_kib);
    let cpu_before = server_pid.and_then(cpu_seconds);
    let started = Instant::now();
    let mut chunks = client.export(request).await?.into_inner();
    let mut events = 0u64;
    let mut bytes = 0usize;
    let mut total = 0u64;
    let mut peak_rss = rss_before.unwrap_or(0);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        total = total.max(chunk.total_events);
        events += chunk.events;
        bytes += chunk.ndjson.len();
        if let Some(rss) = server_pid.and_then(current_rss_kib) {
            peak_rss = peak_rss.max(rss);
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{name}: {events} events (announced {total}), {:.1} MiB NDJSON in {:.3} s = {:.0} events/s",
        bytes as f64 / 1048576.0,
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
    if let Some(before) = rss_before {
        println!(
            "  server RSS during export: {:.1} MiB before, {:.1} MiB at most",
            before as f64 / 1024.0,
            peak_rss as f64 / 1024.0
        );
    }
    let cpu_after = server_pid.and_then(cpu_seconds);
    if let (Some(before), Some(after)) = (cpu_before, cpu_after)
        && events > 0
    {
        println!(
            "  server CPU during export: {:.2} µs per event ({:.3} s)",
            (after - before) * 1e6 / events as f64,
            after - before
        );
    }
    Ok(())
}

/// Current resident set size (VmRSS) of a process, in KiB.
fn current_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// This process's own CPU time since `before` (a reading of [`own_cpu`]), in seconds.
fn own_cpu_since(before: Option<f64>) -> Option<f64> {
    before.zip(own_cpu()).map(|(before, now)| now - before)
}

/// This process's own CPU time so far (user + system), in seconds.
fn own_cpu() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// CPU time (user + system) a process has used so far, in seconds, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields of interest follow its closing parenthesis
    // (utime and stime are fields 14 and 15 of the line, 12 and 13 after the name).
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|ticks| *ticks > 0)?;
    Some((user + system) as f64 / ticks_per_second as f64)
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens `--idle-tails` Tail streams over ten connections; the streams are never read.
async fn idle_tails(
    args: &BenchArgs,
) -> Result<Vec<tonic::Streaming<sluice::proto::TailResponse>>, BenchError> {
    use sluice::proto::{TailRequest, query_service_client::QueryServiceClient};
    if args.idle_tails == 0 {
        return Ok(Vec::new());
    }
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(QueryServiceClient::new(args.connect.channel().await?));
    }
    let mut tails = Vec::with_capacity(args.idle_tails);
    for index in 0..args.idle_tails {
        let client = &mut clients[index % 10];
        tails.push(client.tail(TailRequest::default()).await?.into_inner());
    }
    println!("idle Tail streams: {}", tails.len());
    Ok(tails)
}

pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    println!(
        "sluice bench: {} events, {} streams, {} events/request, window {}",
        args.events, args.streams, args.batch, args.window
    );
    let (ceiling, files) = match &args.database_url {
        Some(url) => {
            reset_if_asked(url, &args).await?;
            let ceiling = copy_ceiling(url, &args).await?;
            // From the rows the raw ceiling loaded.
            let files = if args.file_ceiling {
                Some(file_ceilings(url, &args).await?)
            } else {
                None
            };
            (Some(ceiling), files)
        }
        None => (None, None),
    };
    if let Some(url) = &args.database_url {
        reset_if_asked(url, &args).await?;
    }
    if let Some(rate) = ceiling {
        println!(
            "raw COPY ceiling: {rate:.0} rows/s ({} connections, {}-row batches)",
            args.copy_connections,
            args.ceiling_batch.unwrap_or(args.batch)
        );
    }
    if let Some(files) = files {
        println!(
            "PostgreSQL's own load from files: binary {:.0} rows/s, text {:.0} rows/s (server-side COPY, {} connections, {}-row files)",
            files.binary,
            files.text,
            args.copy_connections,
            args.ceiling_batch.unwrap_or(args.batch)
        );
    }
    // Held open, never read, until the report is printed.
    let _tails = idle_tails(&args).await?;
    let workload = workload(&args);
    let rollup_before = match (&args.database_url, args.wait_stored) {
        (Some(url), true) => rollup_total(&mut sqlx::PgConnection::connect(url).await?).await?,
        _ => 0,
    };
    let started = Instant::now();
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    let report = grpc_load(&args, &workload).await?;
    report.print("sluice ingest:   ");
    let native_cpu = cpu_per_event(&args, cpu_before, report.events);
    if args.otlp {
        let exports = otlp::requests(&workload);
        if let Some(url) = &args.database_url {
            reset_if_asked(url, &args).await?;
        }
        let cpu_before = args.server_pid.and_then(cpu_seconds);
        let logs = otlp::load(&args, &exports, report.events).await?;
        logs.print("sluice OTLP logs:");
        let logs_cpu = cpu_per_event(&args, cpu_before, logs.events);
        print_comparison(
            "OTLP / native",
            (logs.rate(), logs_cpu),
            (report.rate(), native_cpu),
        );
        if let Some(rate) = ceiling {
            println!("OTLP ratio to raw COPY ceiling: {:.2}", logs.rate() / rate);
        }
        print_file_ratio("OTLP ratio", logs.rate(), files);
        // The same rows again through the native path: what the protocol costs, apart from
        // what OTLP's larger rows cost PostgreSQL.
        let twins = otlp::native_twins(&workload, args.ids);
        if let Some(url) = &args.database_url {
            reset_if_asked(url, &args).await?;
        }
        let cpu_before = args.server_pid.and_then(cpu_seconds);
        let same_rows = grpc_load(&args, &twins).await?;
        same_rows.print("native, OTLP's rows:");
        let same_rows_cpu = cpu_per_event(&args, cpu_before, same_rows.events);
        print_comparison(
            "OTLP / native with the same rows",
            (logs.rate(), logs_cpu),
            (same_rows.rate(), same_rows_cpu),
        );
    }
    if let (Some(url), true) = (&args.database_url, args.wait_stored) {
        wait_stored(url, report.events, rollup_before).await?;
        let elapsed = started.elapsed();
        println!(
            "stored end to end: {:.0} events/s (all {} in events {:.2} s after the first send)",
            report.events as f64 / elapsed.as_secs_f64(),
            report.events,
            elapsed.as_secs_f64()
        );
        if let Some(rate) = ceiling {
            println!(
                "end-to-end ratio to raw COPY ceiling: {:.2}",
                report.events as f64 / elapsed.as_secs_f64() / rate
            );
        }
    }
    if let Some(rate) = ceiling {
        let ratio = report.rate() / rate;
        println!("ratio to raw COPY ceiling: {ratio:.2}");
    }
    print_file_ratio("ratio", report.rate(), files);
    if args.duplicates {
        let again = grpc_load(&args, &workload).await?;
        again.print("resend (all dup):");
        println!(
            "duplicate path / first pass: {:.2}",
            again.rate() / report.rate()
        );
    }
    if let (Some(url), true) = (&args.database_url, args.reset_table) {
        let mut connection = sqlx::PgConnection::connect(url).await?;
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut connection)
            .await?;
        println!(
            "rows in events after the run: {stored} (acknowledged: {})",
            report.events
        );
    }
    if let Some(pid) = args.server_pid {
        match peak_rss_kib(pid) {
            Some(kib) => println!("server peak RSS:  {:.1} MiB", kib as f64 / 1024.0),
            None => println!("server peak RSS:  unavailable (no /proc/{pid}/status)"),
        }
    }
    Ok(())
}

/// One load against another, each as (events/s, server CPU µs per event when known).
fn print_comparison(label: &str, load: (f64, Option<f64>), other: (f64, Option<f64>)) {
    let cpu = match (load.1, other.1) {
        (Some(load), Some(other)) => format!(", {:.2} of the CPU per event", load / other),
        _ => String::new(),
    };
    println!("{label}: {:.2} of the events/s{cpu}", load.0 / other.0);
}

/// Prints and returns the server's CPU time per event since `before` (with `--server-pid`).
fn cpu_per_event(args: &BenchArgs, before: Option<f64>, events: u64) -> Option<f64> {
    let (before, after) = (before?, args.server_pid.and_then(cpu_seconds)?);
    if events == 0 {
        return None;
    }
    let per_event = (after - before) * 1e6 / events as f64;
    println!(
        "server CPU:       {per_event:.2} µs per event (user + system, {:.2} s over the load)",
        after - before
    );
    Some(per_event)
}

/// Waits until all `acknowledged` events are in PostgreSQL (at most 10 minutes). It watches the hourly rollup that
/// the writers keep in the same transaction as each COPY (a handful of rows), counted from
/// `rollup_before`, and only then counts the rows, and again until they are all there. Polling
/// `count(*)` over the table instead scanned up to a million rows every 50 ms, with parallel
/// workers, on the cores PostgreSQL was storing on while Redis mode's writers drained.
async fn wait_stored(url: &str, acknowledged: u64, rollup_before: i64) -> Result<(), BenchError> {
    let started = Instant::now();
    let give_up = || started.elapsed() > Duration::from_secs(600);
    let mut connection = sqlx::PgConnection::connect(url).await?;
    while (rollup_total(&mut connection).await? - rollup_before) < acknowledged as i64 && !give_up()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut connection)
            .await?;
        if stored as u64 >= acknowledged || give_up() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events the writers have counted into the hourly rollup, all services and hours.
async fn rollup_total(connection: &mut sqlx::PgConnection) -> Result<i64, BenchError> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(sum(events), 0)::bigint FROM event_counts")
            .fetch_one(connection)
            .await?,
    )
}

/// `rate` against the better of PostgreSQL's own loads from files, when measured.
fn print_file_ratio(label: &str, rate: f64, files: Option<FileCeilings>) {
    if let Some(files) = files {
        let (best, format) = files.best();
        println!(
            "{label} to PostgreSQL's own load from files ({format}): {:.2}",
            rate / best
        );
    }
}

async fn reset_if_asked(url: &str, args: &BenchArgs) -> Result<(), BenchError> {
    if args.reset_table {
        let mut connection = sqlx::PgConnection::connect(url).await?;
        sqlx::query("TRUNCATE events")
            .execute(&mut connection)
            .await?;
        sqlx::query("CHECKPOINT").execute(&mut connection).await?;
    }
    Ok(())
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_a_running_process_is_read_and_grows_with_work() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).expect("this process's CPU time");
        // Spins until the kernel has counted a clock tick more, however busy the machine.
        let mut spin = 0u64;
        let started = Instant::now();
        let mut after = before;
        while after < before + 0.01 {
            for _ in 0..100_000 {
                spin = spin.wrapping_add(std::hint::black_box(1));
            }
            after = cpu_seconds(pid).expect("again");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{before} → {after} after {spin} spins"
            );
        }
        assert!(cpu_seconds(u32::MAX).is_none(), "no such process");
    }
}
