//! The `sluice` command: `sluice` (or `sluice serve`) runs the server; `sluice certs` issues
//! client certificates from the dev CA; `sluice lifecycle --once` and `sluice privacy rotate`
//! run jobs against the database; `sluice backup`, `sluice restore` and `sluice wal-push` /
//! `wal-fetch` back up and restore the private cluster; `sluice bench` runs the load
//! generator.

mod cli;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use figment::Figment;
use sluice::backup::base::AfterRestore;
use sluice::config::{Config, LogFormat, Role};
use sluice::telemetry::Telemetry;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "gRPC streaming ingestion of events into PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Issue a client certificate signed by the dev CA (for another service or person).
    Certs {
        /// Common name of the client (e.g. the service name).
        #[arg(long)]
        name: String,
        /// Directory holding the dev CA (`ca.pem`, `ca.key`).
        #[arg(long, default_value = "certs")]
        cert_dir: PathBuf,
        /// Where to write `<name>.pem` and `<name>.key`.
        #[arg(long, default_value = "certs")]
        out_dir: PathBuf,
    },
    /// Sends NDJSON events (a file or stdin) over IngestStream, resending what the server
    /// refuses; exit code 2 when any line was invalid or rejected.
    Send(cli::send::SendArgs),
    /// Queries events: a table on a terminal, NDJSON otherwise.
    Query(cli::read::QueryArgs),
    /// Exports every matching event as NDJSON, to a file or stdout.
    Export(cli::read::ExportArgs),
    /// Deletes events (right to be forgotten) after showing the dry run's counts.
    Delete(cli::read::DeleteArgs),
    /// Prints the server's stats.
    Stats(cli::read::StatsArgs),
    /// Follows new events as they are stored, like `tail -f`.
    Tail(cli::read::TailArgs),
    /// Load generator: N concurrent mTLS streams against a running server, plus the raw COPY
    /// ceiling of the same database, and their ratio.
    Bench(cli::bench::BenchArgs),
    /// Read-side load: Query, next page and Stats latency percentiles, and Export throughput.
    BenchQuery(cli::bench::QueryBenchArgs),
    /// Privacy jobs against the configured database.
    Privacy {
        #[command(subcommand)]
        action: PrivacyAction,
    },
    /// Base backups of the private cluster (`backup.url`): `--once` takes one now,
    /// `--verify` restores the newest into a scratch directory and counts its rows.
    Backup {
        #[arg(long, required_unless_present = "verify")]
        once: bool,
        #[arg(long, conflicts_with = "once")]
        verify: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Rebuilds the private cluster from backups at a point in time, into a data directory
    /// that has none; start `sluice --data-dir DIR` on it afterwards.
    Restore {
        /// `latest` (every archived WAL segment) or an RFC 3339 time
        /// (`2026-12-01T10:00:00Z`): the last commit at or before it is the last restored.
        #[arg(long, default_value = "latest")]
        to: String,
        /// The data directory to rebuild (its `postgres/` must not hold a cluster).
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup repository. Default: `backup.url` of the configuration.
        #[arg(long)]
        backup_url: Option<String>,
        /// Leave undone the Deletes, Anonymizes and opt-outs made since the restored backup
        /// (to bring back what a mistaken Delete removed). Without it, the server applies
        /// them again before it serves.
        #[arg(long)]
        undo_erasures: bool,
        /// Configuration file (TOML). Default: `sluice.toml` if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Archives one WAL file: PostgreSQL's `archive_command`, set by sluice.
    WalPush {
        #[arg(long)]
        url: String,
        /// `%p`: the file's path.
        path: PathBuf,
        /// `%f`: its name.
        name: String,
    },
    /// Restores one WAL file: PostgreSQL's `restore_command` during `sluice restore`. Exit
    /// code 1, quietly, when the repository has no such file; 255 (recovery aborts) when the
    /// repository cannot be read after retries.
    WalFetch {
        #[arg(long)]
        url: String,
        /// `%f`: the file's name.
        name: String,
        /// `%p`: where to write it.
        path: PathBuf,
    },
    /// Runs the lifecycle job (retention) against the configured database and exits.
    Lifecycle {
        /// Run once now (the server runs it every `lifecycle.interval` by itself).
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Subcommand)]
enum PrivacyAction {
    /// Re-encrypts, under the newest key, every encrypted metadata value written under an
    /// older one, in `events`, dead letters and archived objects; prints a JSON report.
    Rotate {
        /// Make a new encryption key first (by the KMS with `privacy.kms.key_id`, else
        /// appended to the key file): it encrypts new values from then on.
        #[arg(long)]
        new_key: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Moves the key file's keys to the KMS: wraps each with `privacy.kms.key_id` and stores
    /// it in PostgreSQL beside its fingerprint. The keys do not change.
    KmsImport {
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Wraps the stored keys with another KMS key (no value is rewritten); then set
    /// `privacy.kms.key_id` to it on every node.
    Rewrap {
        /// The new KMS key (id, ARN or alias/...).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// Configuration file (TOML). Default: `sluice.toml` if it exists.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Listen address (config `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// PostgreSQL URL (config `database.url`). Unset: a private cluster under the data dir.
    #[arg(long)]
    database_url: Option<String>,
    /// Data directory (config `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve plaintext without TLS. Local development only.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Log format (config `log.format`).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Prometheus endpoint address (config `metrics.listen`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// This node's role in Redis mode (config `role`): all, ingest or writer.
    #[arg(long, value_enum)]
    role: Option<Role>,
}

impl ServeArgs {
    fn overrides(&self) -> Figment {
        let mut figment = Figment::new();
        if let Some(listen) = self.listen {
            figment = figment.merge(("listen", listen.to_string()));
        }
        if let Some(url) = &self.database_url {
            figment = figment.merge(("database.url", url));
        }
        if let Some(data_dir) = &self.data_dir {
            figment = figment.merge(("data_dir", data_dir));
        }
        if self.insecure_plaintext {
            figment = figment.merge(("tls.insecure_plaintext", true));
        }
        if let Some(format) = self.log_format {
            figment = figment.merge(("log.format", format));
        }
        if let Some(address) = self.metrics_listen {
            figment = figment.merge(("metrics.listen", address.to_string()));
        }
        if let Some(role) = self.role {
            figment = figment.merge(("role", role));
        }
        figment
    }
}

/// jemalloc: about a quarter less CPU per event than glibc's malloc on the ingest path, where
/// events are allocated on one thread and freed on another (BENCHMARKS.md, "Performance").
/// Its options (`.cargo/config.toml`) return freed memory to the system within seconds.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("sluice: a rustls crypto provider was already installed");
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sluice: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        None => runtime.block_on(serve(cli.serve)),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        Some(Command::Certs {
            name,
            cert_dir,
            out_dir,
        }) => issue_certs(&name, &cert_dir, &out_dir),
        Some(Command::Send(args)) => match runtime.block_on(cli::send::run(args)) {
            Ok(summary) => match print_json("sluice send", &summary) {
                ExitCode::SUCCESS => ExitCode::from(summary.exit_code()),
                failed => failed,
            },
            Err(error) => client_failed("send", error),
        },
        Some(Command::Query(args)) => {
            client_outcome("query", runtime.block_on(cli::read::query(args)))
        }
        Some(Command::Export(args)) => client_outcome(
            "export",
            runtime.block_on(cli::read::export(args)).map(|_| ()),
        ),
        Some(Command::Delete(args)) => {
            client_outcome("delete", runtime.block_on(cli::read::delete(args)))
        }
        Some(Command::Stats(args)) => {
            client_outcome("stats", runtime.block_on(cli::read::stats(args)))
        }
        Some(Command::Tail(args)) => {
            client_outcome("tail", runtime.block_on(cli::read::tail(args)))
        }
        Some(Command::Bench(args)) => bench(runtime.block_on(cli::bench::run(args))),
        Some(Command::BenchQuery(args)) => bench(runtime.block_on(cli::bench::run_queries(args))),
        Some(Command::Lifecycle { once, serve }) => {
            if !once {
                eprintln!("sluice lifecycle: pass --once (the server runs the job on its own)");
                return ExitCode::FAILURE;
            }
            runtime.block_on(job("sluice lifecycle", &serve, lifecycle_job))
        }
        Some(Command::Privacy {
            action: PrivacyAction::Rotate { new_key, serve },
        }) => runtime.block_on(job(
            "sluice privacy rotate",
            &serve,
            async |config: Config| cli::privacy::rotate(&config, new_key).await,
        )),
        Some(Command::Privacy {
            action: PrivacyAction::KmsImport { serve },
        }) => runtime.block_on(job(
            "sluice privacy kms-import",
            &serve,
            async |config: Config| cli::privacy::kms_import(&config).await,
        )),
        Some(Command::Privacy {
            action: PrivacyAction::Rewrap { to, serve },
        }) => runtime.block_on(job(
            "sluice privacy rewrap",
            &serve,
            async |config: Config| cli::privacy::rewrap(&config, &to).await,
        )),
        Some(Command::Backup {
            once: _,
            verify: true,
            serve,
        }) => runtime.block_on(job(
            "sluice backup --verify",
            &serve,
            async |config: Config| cli::backup::verify(&config).await,
        )),
        Some(Command::Backup { serve, .. }) => runtime.block_on(job(
            "sluice backup --once",
            &serve,
            async |config: Config| cli::backup::once(&config).await,
        )),
        Some(Command::Restore {
            to,
            data_dir,
            backup_url,
            undo_erasures,
            config,
        }) => {
            let erasures = if undo_erasures {
                AfterRestore::Undo
            } else {
                AfterRestore::Reapply
            };
            runtime.block_on(restore_job(to, data_dir, backup_url, erasures, config))
        }
        Some(Command::WalPush { url, path, name }) => {
            match runtime.block_on(cli::backup::wal_push(&url, &path, &name)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("sluice wal-push {name}: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::WalFetch { url, name, path }) => {
            match runtime.block_on(cli::backup::wal_fetch(&url, &name, &path)) {
                Ok(true) => ExitCode::SUCCESS,
                // "Not in the archive": the normal end of recovery.
                Ok(false) => ExitCode::FAILURE,
                // Anything else must not look like the end of the archive, or recovery would
                // stop early and promote: PostgreSQL aborts recovery on a status above 125.
                Err(error) => {
                    eprintln!("sluice wal-fetch {name}: {error}");
                    ExitCode::from(255)
                }
            }
        }
    }
}

/// `sluice restore`: rebuilds the private cluster; prints the report as JSON.
async fn restore_job(
    to: String,
    data_dir: PathBuf,
    backup_url: Option<String>,
    erasures: AfterRestore,
    config: Option<PathBuf>,
) -> ExitCode {
    let args = ServeArgs {
        config,
        data_dir: Some(data_dir.clone()),
        ..ServeArgs::default()
    };
    job("sluice restore", &args, async |config: Config| {
        let target = cli::backup::recovery_target(&to)?;
        cli::backup::restore(&config, backup_url.as_deref(), target, &data_dir, erasures).await
    })
    .await
}

/// A job against the configuration (file, environment, flags): loads it and starts logging
/// and trace export, runs `work`, flushes the traces, and prints the report as JSON (or the
/// error, exiting non-zero).
async fn job<T: serde::Serialize, E: std::fmt::Display>(
    name: &str,
    args: &ServeArgs,
    work: impl AsyncFnOnce(Config) -> Result<T, E>,
) -> ExitCode {
    let Some((config, telemetry)) = load_config(args) else {
        return ExitCode::FAILURE;
    };
    let outcome = work(config).await;
    flush_traces(telemetry).await;
    match outcome {
        Ok(report) => print_json(name, &report),
        Err(error) => {
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the configuration (file, environment, flags) and starts logging and trace export;
/// None after saying why it cannot.
fn load_config(args: &ServeArgs) -> Option<(Config, Telemetry)> {
    let config = match Config::load(args.config.as_deref(), args.overrides()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sluice: {error}");
            return None;
        }
    };
    match sluice::telemetry::init(&config.log, &config.telemetry) {
        Ok(telemetry) => Some((config, telemetry)),
        Err(error) => {
            eprintln!("sluice: {error}");
            None
        }
    }
}

/// Flushes the spans still queued for export (a blocking call, off the async workers).
async fn flush_traces(telemetry: Telemetry) {
    if tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .is_err()
    {
        eprintln!("sluice: flushing traces at exit panicked");
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let Some((config, telemetry)) = load_config(&args) else {
        return ExitCode::FAILURE;
    };
    let reloader: sluice::server::Reloader =
        Box::new(move || Config::load(args.config.as_deref(), args.overrides()));
    let outcome = sluice::server::run(config, Some(reloader)).await;
    if let Err(error) = &outcome {
        tracing::error!(%error, "sluice stopped on an error");
    }
    flush_traces(telemetry).await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// A job's failure, with its source kept for the message.
type JobError = Box<dyn std::error::Error>;

/// `sluice lifecycle --once`: the job once, against the configured database.
async fn lifecycle_job(config: Config) -> Result<sluice::lifecycle::Report, JobError> {
    let policy = sluice::lifecycle::RetentionPolicy::new(&config.retention)?;
    let archive = sluice::server::open_archive(&config).await?;
    let store = sluice::store::Store::open(&config).await?;
    let outcome = sluice::lifecycle::run_once(&store.maintenance_pool, &policy, &archive).await;
    store.close().await;
    Ok(outcome?)
}

/// Prints `report` as one line of JSON; a report that cannot be serialized is a failure.
fn print_json<T: serde::Serialize>(name: &str, report: &T) -> ExitCode {
    match serde_json::to_string(report) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{name}: cannot write the report as JSON: {error}");
            ExitCode::FAILURE
        }
    }
}

fn client_outcome<E: std::fmt::Display>(command: &str, outcome: Result<(), E>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => client_failed(command, error),
    }
}

fn client_failed(command: &str, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("sluice {command}: {error}");
    ExitCode::FAILURE
}

fn bench(result: Result<(), cli::bench::BenchError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn issue_certs(name: &str, cert_dir: &std::path::Path, out_dir: &std::path::Path) -> ExitCode {
    match sluice::tls::issue_client_cert(cert_dir, name, out_dir) {
        Ok((cert, key)) => {
            println!("wrote {} and {}", cert.display(), key.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("sluice certs: {error}");
            ExitCode::FAILURE
        }
    }
}
