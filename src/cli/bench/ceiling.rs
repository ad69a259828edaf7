//! The ceilings sluice's ingest is measured against, on the same rows: the raw client COPY
//! (`copy_ceiling`: binary COPY FROM STDIN over `--copy-connections`, `--ceiling-batch` rows a
//! transaction), and PostgreSQL loading the same rows from files on its own machine
//! (`file_ceilings`: server-side `COPY … FROM 'file'`, binary and text, no client at all).

use std::time::Instant;

use bytes::BytesMut;
use chrono::Utc;
use rand::{SeedableRng, rngs::StdRng};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::{BenchArgs, BenchError, IdKind, sample_event};
use sluice::{event::ValidEvent, proto::Event, writer::copy};

/// Times binary COPY of `args.events` rows in `args.batch`-row batches over
/// `args.copy_connections` connections. Returns rows per second.
pub async fn copy_ceiling(url: &str, args: &BenchArgs) -> Result<f64, BenchError> {
    let per_connection = args.events / args.copy_connections.max(1);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for connection_index in 0..args.copy_connections.max(1) {
        let url = url.to_owned();
        let batch = args.ceiling_batch.unwrap_or(args.batch).max(1);
        let ids = args.ids;
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(connection_index as u64);
            let mut connection = sqlx::PgConnection::connect(&url).await?;
            // The same socket settings as the server's pool, for a fair ceiling.
            sluice::store::nodelay::enable(&mut connection).await?;
            let mut sent = 0;
            while sent < per_connection {
                let count = batch.min(per_connection - sent);
                let rows: Vec<ValidEvent> = (0..count)
                    .map(|offset| as_valid(sample_event(&mut rng, sent + offset, ids), ids))
                    .collect();
                let mut payload = BytesMut::new();
                copy::encode(rows.iter(), &mut payload)
                    .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
                let statement =
                    format!("COPY events ({}) FROM STDIN (FORMAT binary)", copy::COLUMNS);
                let mut copy_in = connection.copy_in_raw(&statement).await?;
                copy_in.send(payload.freeze()).await?;
                copy_in.finish().await?;
                sent += count;
            }
            Ok::<usize, sqlx::Error>(sent)
        });
    }
    let mut rows = 0;
    while let Some(result) = tasks.join_next().await {
        rows += result??;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// The row the server would store for `event` (the bench's events are always valid).
fn as_valid(event: Event, ids: IdKind) -> ValidEvent {
    let metadata_json = serde_json::json!({"path": "/api/orders", "status": 200, "latencyMs": 12, "region": "eu-west-1"}).to_string();
    ValidEvent {
        trace_id: None,
        index: 0,
        id: ids.stored(),
        service: event.service,
        message: event.message,
        timestamp: Utc::now(),
        user_id: Some(event.user_id),
        metadata_json,
    }
}

/// The rates of PostgreSQL loading the rows from files itself, in rows per second.
#[derive(Debug, Clone, Copy)]
pub struct FileCeilings {
    pub binary: f64,
    pub text: f64,
}

impl FileCeilings {
    /// The better of the two, and its format's name.
    pub fn best(&self) -> (f64, &'static str) {
        if self.binary >= self.text {
            (self.binary, "binary")
        } else {
            (self.text, "text")
        }
    }
}

/// A COPY file format.
#[derive(Debug, Clone, Copy)]
enum FileFormat {
    Binary,
    Text,
}

impl FileFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Binary => "binary",
            Self::Text => "text",
        }
    }
}

/// The table the rows are numbered in while the files are written.
const NUMBERED: &str = "sluice_bench_rows";

/// Times PostgreSQL loading the rows `events` holds (those of [`copy_ceiling`]) from files it
/// reads itself: the rows are written out by PostgreSQL (`COPY … TO`, into its data
/// directory) as files of `--ceiling-batch` rows, in binary and in text, then each format is
/// loaded into the emptied table over `--copy-connections` connections, one transaction per
/// file as the raw ceiling commits per batch. The files are emptied afterwards; `events` is
/// left empty.
pub async fn file_ceilings(url: &str, args: &BenchArgs) -> Result<FileCeilings, BenchError> {
    let mut connection = PgConnection::connect(url).await?;
    let batch = args.ceiling_batch.unwrap_or(args.batch).max(1) as i64;
    let columns = copy::COLUMNS;
    execute(
        &mut connection,
        format!(
            "DROP TABLE IF EXISTS {NUMBERED}; \
             CREATE UNLOGGED TABLE {NUMBERED} AS \
             SELECT row_number() OVER () AS n, {columns} FROM events; \
             CREATE INDEX ON {NUMBERED} (n)"
        ),
    )
    .await?;
    // PostgreSQL writes and reads the files itself: in its own data directory.
    let directory: String = sqlx::query_scalar("SELECT current_setting('data_directory')")
        .fetch_one(&mut connection)
        .await?;
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {NUMBERED}")))
        .fetch_one(&mut connection)
        .await?;
    let mut rates = [0.0; 2];
    for (rate, format) in rates.iter_mut().zip([FileFormat::Binary, FileFormat::Text]) {
        let mut files = Vec::new();
        for (index, first) in (0..rows).step_by(batch as usize).enumerate() {
            let file = format!("{directory}/sluice-bench-{}-{index:05}.copy", format.name());
            execute(
                &mut connection,
                format!(
                    "COPY (SELECT {columns} FROM {NUMBERED} WHERE n > {first} AND n <= {}) \
                     TO '{file}' (FORMAT {})",
                    first + batch,
                    format.name()
                ),
            )
            .await?;
            files.push(file);
        }
        execute(&mut connection, "TRUNCATE events; CHECKPOINT".to_owned()).await?;
        let seconds = load_files(url, &files, format, args.copy_connections.max(1)).await?;
        let loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut connection)
            .await?;
        *rate = loaded as f64 / seconds;
        for file in &files {
            execute(
                &mut connection,
                format!("COPY (SELECT 1 WHERE false) TO '{file}'"),
            )
            .await?;
        }
    }
    execute(
        &mut connection,
        format!("TRUNCATE events; DROP TABLE {NUMBERED}; CHECKPOINT"),
    )
    .await?;
    Ok(FileCeilings {
        binary: rates[0],
        text: rates[1],
    })
}

/// Loads `files` into `events` over `connections` connections, each its share in turn, one
/// transaction per file. Returns the seconds it took.
async fn load_files(
    url: &str,
    files: &[String],
    format: FileFormat,
    connections: usize,
) -> Result<f64, BenchError> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for connection_index in 0..connections {
        let url = url.to_owned();
        let mine: Vec<String> = files
            .iter()
            .skip(connection_index)
            .step_by(connections)
            .cloned()
            .collect();
        tasks.spawn(async move {
            let mut connection = PgConnection::connect(&url).await?;
            for file in mine {
                execute(
                    &mut connection,
                    format!(
                        "COPY events ({}) FROM '{file}' (FORMAT {})",
                        copy::COLUMNS,
                        format.name()
                    ),
                )
                .await?;
            }
            Ok::<(), sqlx::Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn execute(connection: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(connection)
        .await?;
    Ok(())
}
