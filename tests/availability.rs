//! Availability (issue: HA and DR): readiness that includes disk space and memory, and a
//! breaker that opens on slow writes, against the real server and a real PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::{ServerSpec, TestDatabase, TestServer, event, metric_sum, publish, wait_for_status};
use tonic_health::pb::health_check_response::ServingStatus;

/// Polls the server's metrics until `ready` holds of them (at most 30 s).
async fn wait_for_metrics(server: &TestServer, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = server.metrics().await;
        if ready(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}:\n{metrics}\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

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
    let metrics = wait_for_metrics(&server, "the failing disk check", |metrics| {
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
    wait_for_metrics(&server, "the failing memory check", |metrics| {
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
    let metrics = wait_for_metrics(&server, "the breaker opened by the slow rule", |metrics| {
        metric_sum(metrics, "sluice_breaker_opened_total", "cause=\"slow_writes\"") >= 1.0
    })
    .await;
    assert!(
        metric_sum(&metrics, "sluice_breaker_opened_total", "cause=\"failures\"") == 0.0,
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
