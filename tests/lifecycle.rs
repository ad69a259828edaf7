//! Retention per service against the real server and PostgreSQL: old events are refused at
//! ingest with their rule named, and `sluice lifecycle --once` deletes exactly what the rules
//! no longer keep, drops partitions past every rule, and runs on one node at a time.

mod common;

use std::process::Command;

use chrono::{Datelike, Duration, Months, NaiveDate, Utc};
use common::{ServerSpec, TestDatabase, TestServer, event, request};

const RULES: &str = r#"
[retention]
default = "30days"

[[retention.rules]]
services = ["audit-*"]
keep = "365days"

[[retention.rules]]
services = ["debug-*"]
keep = "1day"

[lifecycle]
enabled = false

# These tests are about retention in PostgreSQL; tests/archive.rs covers the archive.
[archive]
after = "off"
"#;

/// A server whose `sluice.toml` holds [`RULES`].
async fn start_with_rules(database: &TestDatabase) -> TestServer {
    TestServer::start(ServerSpec::with_database(&database.url).toml(RULES)).await
}

/// Runs `sluice lifecycle --once` with the server's configuration; returns its JSON report.
fn lifecycle_once(server: &TestServer, database_url: &str) -> serde_json::Value {
    common::lifecycle_once(server, database_url, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_keeps_exactly_its_window_and_old_partitions_are_dropped() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start_with_rules(&database).await;

    // At ingest, an event older than its service's retention is refused, the rule named.
    let mut client = server.ingest_client().await;
    let now = Utc::now();
    let mut stale = event("debug-api", "two days old");
    stale.timestamp = Some(prost_types::Timestamp {
        seconds: (now - Duration::days(2)).timestamp(),
        nanos: 0,
    });
    let mut kept_audit = event("audit-log", "a hundred days old");
    kept_audit.timestamp = Some(prost_types::Timestamp {
        seconds: (now - Duration::days(100)).timestamp(),
        nanos: 0,
    });
    let response = client
        .publish(request(vec![stale, kept_audit]))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!((response.accepted, response.rejected), (1, 1));
    assert_eq!(response.rejections[0].field, "timestamp");
    assert!(
        response.rejections[0].reason.contains("debug-*"),
        "{}",
        response.rejections[0].reason
    );

    // Rows written straight into PostgreSQL, as an older configuration would have kept them.
    let mut connection = database.connect().await;
    let old_month = (now - Duration::days(400)).date_naive();
    let start = NaiveDate::from_ymd_opt(old_month.year(), old_month.month(), 1).expect("month");
    let end = start
        .checked_add_months(Months::new(1))
        .expect("next month");
    let old_partition = format!("events_p{}_{:02}", start.year(), start.month());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {old_partition} PARTITION OF events FOR VALUES FROM ('{start}') TO ('{end}')"
    )))
    .execute(&mut connection)
    .await
    .expect("old partition");
    let rows = [
        ("debug-api", Duration::days(2), false),
        ("debug-api", Duration::hours(1), true),
        ("checkout", Duration::days(40), false),
        ("checkout", Duration::days(10), true),
        ("audit-log", Duration::days(200), true),
        ("audit-log", Duration::days(400), false),
    ];
    for (service, age, _) in rows {
        sqlx::query(
            "INSERT INTO events (id, service, message, ts, metadata) VALUES ($1, $2, 'seeded', $3, '{}')",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(service)
        .bind(now - age)
        .execute(&mut connection)
        .await
        .expect("seed");
    }
    sqlx::query(
        "INSERT INTO dead_letters (event_id, ts, service, raw, error) VALUES ($1, $2, 'debug-api', '\\x00', 'seeded')",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(now - Duration::days(3))
    .execute(&mut connection)
    .await
    .expect("seed dead letter");

    // Another node holds the job's lock: this run does nothing.
    let mut holder = database.connect().await;
    sqlx::query("SELECT pg_advisory_lock(hashtext('sluice.lifecycle'))")
        .execute(&mut holder)
        .await
        .expect("lock");
    let skipped = lifecycle_once(&server, &database.url);
    assert_eq!(skipped["ran"], false);
    sqlx::query("SELECT pg_advisory_unlock(hashtext('sluice.lifecycle'))")
        .execute(&mut holder)
        .await
        .expect("unlock");

    let report = lifecycle_once(&server, &database.url);
    assert_eq!(report["ran"], true, "{report}");
    assert_eq!(
        report["partitions_dropped"][0],
        old_partition.as_str(),
        "{report}"
    );
    // Deleted row by row: the 2-day-old debug event and the 40-day-old checkout one (the
    // 400-day-old audit row went with its partition).
    assert_eq!(report["rows_deleted"], 2, "{report}");
    assert_eq!(report["dead_letters_deleted"], 1, "{report}");
    let count = |service: &'static str| {
        let database = &database;
        async move {
            database
                .scalar(&format!(
                    "SELECT count(*) FROM events WHERE service = '{service}'"
                ))
                .await
        }
    };
    assert_eq!(count("debug-api").await, 1);
    assert_eq!(count("checkout").await, 1);
    assert_eq!(count("audit-log").await, 2, "the 100- and 200-day-old ones");
    assert_eq!(
        database
            .scalar(&format!(
                "SELECT count(*) FROM pg_class WHERE relname = '{old_partition}'"
            ))
            .await,
        0
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM lifecycle_runs WHERE status = 'ok' AND rows_deleted = 2")
            .await,
        1
    );

    // Migration 0005: partitions store metadata and message with lz4 (today's, a daily one).
    let this_month = format!("events_p{}_{:02}_{:02}", now.year(), now.month(), now.day());
    let compression: Vec<String> = sqlx::query_scalar(
        "SELECT attcompression::text FROM pg_attribute \
         WHERE attrelid = $1::regclass AND attname IN ('metadata', 'message') ORDER BY attname",
    )
    .bind(&this_month)
    .fetch_all(&mut connection)
    .await
    .expect("attcompression");
    assert_eq!(compression, ["l", "l"], "lz4 on {this_month}");

    // A second run finds nothing more: the job is idempotent.
    let again = lifecycle_once(&server, &database.url);
    assert_eq!(
        (
            again["rows_deleted"].as_u64(),
            again["partitions_dropped"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_midway_resumes_on_the_next_and_deletes_only_the_expired() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start_with_rules(&database).await;
    let mut connection = database.connect().await;
    const EXPIRED: i64 = 200_000;
    sqlx::query(
        "INSERT INTO events (id, service, message, ts, metadata) \
         SELECT gen_random_uuid(), 'checkout', 'expired', now() - interval '40 days' - i * interval '1 second', '{}' \
         FROM generate_series(1, $1) i",
    )
    .bind(EXPIRED)
    .execute(&mut connection)
    .await
    .expect("seed expired");
    sqlx::query(
        "INSERT INTO events (id, service, message, ts, metadata) \
         SELECT gen_random_uuid(), 'checkout', 'kept', now() - interval '5 days' - i * interval '1 second', '{}' \
         FROM generate_series(1, 1000) i",
    )
    .execute(&mut connection)
    .await
    .expect("seed kept");
    let expired = || database.scalar("SELECT count(*) FROM events WHERE message = 'expired'");
    // The run's second batch waits on a lock the test holds: the kill lands midway however
    // fast the machine deletes (the first batch of 5,000 rows passes, the next row waits).
    let mut holder = database.connect().await;
    for statement in [
        "SELECT pg_advisory_lock(4243)",
        "CREATE SEQUENCE test_deleted_rows",
        "CREATE FUNCTION test_hold_second_batch() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF nextval('test_deleted_rows') > 5000 THEN PERFORM pg_advisory_xact_lock_shared(4243); END IF; \
         RETURN OLD; END $$",
        "CREATE TRIGGER test_hold_second_batch BEFORE DELETE ON events \
         FOR EACH ROW EXECUTE FUNCTION test_hold_second_batch()",
    ] {
        sqlx::query(statement)
            .execute(&mut holder)
            .await
            .expect("hold the second batch");
    }

    // Kill the run with SIGKILL once its first batch has committed.
    let mut run = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "lifecycle",
            "--once",
            "--database-url",
            &database.url,
            "--config",
        ])
        .arg(server.dir_path().join("sluice.toml"))
        .env("SLUICE_DATA_DIR", server.dir_path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start sluice lifecycle");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while expired().await == EXPIRED {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never deleted anything"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    run.kill().expect("SIGKILL");
    run.wait().expect("reap");
    sqlx::query("SELECT pg_advisory_unlock(4243)")
        .execute(&mut holder)
        .await
        .expect("release the second batch");
    // A statement in flight when the client died still finishes in PostgreSQL: count once the
    // dead client's sessions are gone. The trigger is dropped only then: dropping it while that
    // DELETE still runs takes the partitions' locks in another order than the DELETE does, a
    // deadlock PostgreSQL breaks by failing one of the two.
    while database
        .scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'sluice' AND state <> 'idle'",
        )
        .await
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed run's sessions linger"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for statement in [
        "DROP TRIGGER test_hold_second_batch ON events",
        "DROP FUNCTION test_hold_second_batch()",
    ] {
        sqlx::query(statement)
            .execute(&mut holder)
            .await
            .expect("drop the trigger that held the second batch");
    }
    let left = expired().await;
    assert!(
        left > 0 && left < EXPIRED,
        "killed midway: {left} expired rows left"
    );

    // The next run (once PostgreSQL has released the dead session's lock) finishes the job.
    let report = loop {
        let report = lifecycle_once(&server, &database.url);
        if report["ran"] == true {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was never released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(report["rows_deleted"].as_i64(), Some(left), "{report}");
    assert_eq!(expired().await, 0);
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE message = 'kept'")
            .await,
        1000,
        "nothing within the retention was touched"
    );
}
