//! Availability: readiness that includes disk space and memory, a breaker that opens on slow
//! writes, and failover to a promoted standby, against the real server and real PostgreSQL
//! primaries and standbys.

mod common;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{
    ServerSpec, TestDatabase, TestServer, event, free_port, metric_sum, publish,
    streaming::{ids_of, requests, stream_until},
    wait_for_status,
};
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_the_data_volume_is_short_of_free_space() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // No volume has 100% free: the disk check fails from the start, with its reason.
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_HEALTH__MIN_FREE_DISK", "100%"),
    )
    .await;
    wait_for_status(&server, ServingStatus::NotServing).await;
    let metrics = server
        .wait_for_metrics("the failing disk check", |metrics| {
            metrics.contains("sluice_health_check{check=\"disk\"} 0")
        })
        .await;
    assert!(
        metrics.contains("sluice_health_check{check=\"database\"} 1"),
        "{metrics}"
    );
    assert!(metric_sum(&metrics, "sluice_disk_free_bytes", "volume=\"data\"") > 0.0);
    let logs = server.logs();
    assert!(
        logs.lines().any(|line| line.contains("NOT_SERVING")
            && line.contains("disk:")
            && line.contains("free on the data volume")),
        "the log says why:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_resident_memory_passes_its_limit_and_serves_under_it() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_HEALTH__MAX_RSS", "1048576"),
    )
    .await;
    wait_for_status(&server, ServingStatus::NotServing).await;
    server
        .wait_for_metrics("the failing memory check", |metrics| {
            metrics.contains("sluice_health_check{check=\"memory\"} 0")
                && metric_sum(metrics, "sluice_resident_memory_bytes", "") > 1_048_576.0
        })
        .await;
    assert!(server.logs().contains("memory: resident memory"));

    // The default limit (buffer bytes + 256 MiB) serves.
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    wait_for_status(&server, ServingStatus::Serving).await;
    let metrics = server.metrics().await;
    for check in ["database", "buffer", "circuit", "disk", "memory"] {
        assert!(
            metrics.contains(&format!("sluice_health_check{{check=\"{check}\"}} 1")),
            "{check} passes:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_opens_the_breaker_by_the_slow_rule_and_no_event_is_lost() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_BREAKER__SLOW_WRITE", "300ms")
            .env("SLUICE_BREAKER__SLOW_WRITE_COUNT", "2")
            .env("SLUICE_BREAKER__OPEN_INITIAL", "500ms")
            .env("SLUICE_WRITER__WRITE_TIMEOUT", "10s"),
    )
    .await;
    wait_for_status(&server, ServingStatus::Serving).await;
    // Every statement that writes events now takes 0.5 s: slow, but never failing.
    let mut admin = database.connect().await;
    for statement in [
        "CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$",
        "CREATE TRIGGER slow_down AFTER INSERT ON events \
         FOR EACH STATEMENT EXECUTE FUNCTION slow_down()",
    ] {
        sqlx::query(statement)
            .execute(&mut admin)
            .await
            .expect("slow the database down");
    }
    let mut client = server.ingest_client().await;
    let mut sent = 0;
    for round in 0..6 {
        let response = publish(&mut client, vec![event("slow", &format!("slow {round}"))]).await;
        assert_eq!(response.accepted, 1, "acknowledged, slow or not");
        sent += 1;
    }
    let metrics = server
        .wait_for_metrics("the breaker opened by the slow rule", |metrics| {
            metric_sum(
                metrics,
                "sluice_breaker_opened_total",
                "cause=\"slow_writes\"",
            ) >= 1.0
        })
        .await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_breaker_opened_total",
            "cause=\"failures\""
        ) == 0.0,
        "no write failed: the slow rule opened it\n{metrics}"
    );
    assert!(
        server
            .logs()
            .lines()
            .any(|line| line.contains("circuit open") && line.contains("slow_writes")),
        "{}",
        server.logs()
    );
    // While it is open, events are still acknowledged (spooled).
    let response = publish(&mut client, vec![event("slow", "while open")]).await;
    assert_eq!(response.accepted, 1);
    sent += 1;

    // The database is fast again: the circuit closes and every event is stored once.
    sqlx::query("DROP TRIGGER slow_down ON events")
        .execute(&mut admin)
        .await
        .expect("speed the database up");
    wait_for_status(&server, ServingStatus::Serving).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = database
            .scalar("SELECT count(*) FROM events WHERE service = 'slow'")
            .await;
        if stored == sent {
            break;
        }
        assert!(stored < sent, "an event was stored twice");
        assert!(
            Instant::now() < deadline,
            "{stored} of {sent} stored:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A PostgreSQL cluster of the test's own on a free loopback port, run as the `postgres` user
/// when the test runs as root (PostgreSQL refuses root).
struct Cluster {
    data: PathBuf,
    port: u16,
}

/// A PostgreSQL tool, run as `postgres` under root.
fn pg_tool(tool: &str) -> Command {
    let bin = sluice::store::embedded::find_bin_dir().expect("PostgreSQL binaries");
    let path = bin.join(tool);
    if nix::unistd::geteuid().is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn run(mut command: Command) {
    let output = command.output().expect("run a PostgreSQL tool");
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A directory the `postgres` user owns (when the test runs as root).
fn postgres_dir(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create dir");
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("postgres user");
        std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .expect("chown");
    }
}

impl Cluster {
    fn primary(base: &Path) -> Self {
        let data = base.join("primary");
        postgres_dir(base);
        let mut initdb = pg_tool("initdb");
        initdb
            .args([
                "-U",
                "sluice",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "-D",
            ])
            .arg(&data);
        run(initdb);
        let cluster = Self {
            data,
            port: free_port(),
        };
        // Synchronous commit: a commit returns once the standby has it.
        cluster.start("-c synchronous_standby_names='*'");
        cluster
    }

    /// A streaming standby of `primary`, made with `pg_basebackup -R`.
    fn standby_of(primary: &Cluster, base: &Path) -> Self {
        let data = base.join("standby");
        let mut backup = pg_tool("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "sluice",
                "-R",
                "-X",
                "stream",
                "-p",
            ])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&data);
        run(backup);
        let cluster = Self {
            data,
            port: free_port(),
        };
        cluster.start("");
        cluster
    }

    fn start(&self, settings: &str) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off {settings}",
            self.port
        );
        let mut start = pg_tool("pg_ctl");
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]);
        run(start);
    }

    fn stop_immediately(&self) {
        let mut stop = pg_tool("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        run(stop);
    }

    fn promote(&self) {
        let mut promote = pg_tool("pg_ctl");
        promote.arg("-D").arg(&self.data).args(["-w", "promote"]);
        run(promote);
    }

    fn url(&self) -> String {
        format!("postgres://sluice@127.0.0.1:{}/postgres", self.port)
    }

    async fn connect(&self) -> sqlx::PgConnection {
        <sqlx::PgConnection as sqlx::Connection>::connect(&self.url())
            .await
            .expect("connect")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = pg_tool("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let _ = stop.status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_primary_dies_and_the_standby_is_promoted_every_acknowledged_event_is_stored_once_without_a_restart()
 {
    common::init_crypto();
    let base = tempfile::tempdir().expect("tempdir");
    let clusters = base.path().join("clusters");
    let primary = Cluster::primary(&clusters);
    let standby = Cluster::standby_of(&primary, &clusters);
    let mut primary_connection = primary.connect().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sync: Option<String> =
            sqlx::query_scalar("SELECT sync_state FROM pg_stat_replication LIMIT 1")
                .fetch_optional(&mut primary_connection)
                .await
                .expect("replication state");
        if sync.as_deref() == Some("sync") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never became synchronous"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(primary_connection);

    let url = format!(
        "postgres://sluice@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let server = TestServer::start(
        ServerSpec::with_database(&url)
            .env("SLUICE_DATABASE__REQUIRE_SYNC_STANDBY", "true")
            .env("SLUICE_DATABASE__CONNECT_TIMEOUT", "2s")
            .env("SLUICE_BREAKER__OPEN_INITIAL", "200ms")
            .env("SLUICE_BREAKER__OPEN_MAX", "1s")
            .env("SLUICE_WRITER__WRITE_TIMEOUT", "3s"),
    )
    .await;
    wait_for_status(&server, ServingStatus::Serving).await;
    assert!(
        server
            .logs()
            .contains("the primary has a synchronous standby"),
        "{}",
        server.logs()
    );

    let all = requests(3000, 10, "failover");
    let standby_url = standby.url();
    let failover = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::block_in_place(|| primary.stop_immediately());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&standby_url)
            .await
            .expect("connect to the standby");
        let count = || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events");
        let before: i64 = count().fetch_one(&mut connection).await.expect("count");
        tokio::task::block_in_place(|| standby.promote());
        let promoted_at = Instant::now();
        loop {
            let now: i64 = count().fetch_one(&mut connection).await.expect("count");
            if now > before {
                break;
            }
            assert!(
                promoted_at.elapsed() < Duration::from_secs(60),
                "no commit after promotion"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (standby, promoted_at.elapsed())
    });
    let acked = stream_until(&server, &all, 4, Duration::from_millis(3), |_| true).await;
    let (standby, promotion_to_commit) = failover.await.expect("failover task");
    println!("promotion to the first commit on the new primary: {promotion_to_commit:?}");
    assert_eq!(
        acked.len(),
        all.len(),
        "every request acknowledged through the failover"
    );

    // Every acknowledged event is on the new primary, exactly once.
    let mut connection = standby.connect().await;
    let wanted = ids_of(&all);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM events")
            .fetch_all(&mut connection)
            .await
            .expect("ids");
        let stored: HashSet<uuid::Uuid> = ids.iter().copied().collect();
        assert_eq!(ids.len(), stored.len(), "no event stored twice");
        if stored == wanted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} stored on the new primary:\n{}",
            stored.len(),
            wanted.len(),
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Ingest goes on, without a restart of sluice.
    wait_for_status(&server, ServingStatus::Serving).await;
    let mut client = server.ingest_client().await;
    let after = event("failover", "after the failover");
    let after_id = after.id.clone();
    assert_eq!(publish(&mut client, vec![after]).await.accepted, 1);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE id = $1::uuid")
        .bind(&after_id)
        .fetch_one(&mut connection)
        .await
        .expect("count");
    assert_eq!(
        stored, 1,
        "an event acknowledged after the failover is on the new primary"
    );
    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_database_failovers_total",
            "pools=\"write\""
        ) >= 1.0
    );
    let logs = server.logs();
    assert!(logs.contains("database host changed"), "{logs}");
    assert!(
        logs.contains("the primary has no synchronous standby"),
        "the new primary has no standby, and sluice says so:\n{logs}"
    );
}
