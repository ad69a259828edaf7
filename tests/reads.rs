//! Readers that could starve or flood the server, against the real one: an Export whose
//! client stops reading, more calls than a principal may run, huge pages, idle Tail streams,
//! an audit log that cannot be written, and strangers without configured limits.

mod common;

use std::time::{Duration, Instant};

use common::{ServerSpec, TestDatabase, TestServer, event, metric_sum, publish, query_all};
use prost::Message;
use sluice::proto::{
    Event, ExportChunk, ExportRequest, QueryRequest, StatsRequest, TailRequest,
    query_service_client::QueryServiceClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming, transport::Channel};
use tonic_types::StatusExt;

/// `count` events of service `bulk` written straight into PostgreSQL, each about 250 bytes
/// as NDJSON: enough that an Export fills every queue between it and a client that reads
/// nothing.
async fn bulk(database: &TestDatabase, count: i64) {
    let mut connection = database.connect().await;
    sqlx::query(
        "INSERT INTO events (id, service, message, ts, metadata) \
         SELECT gen_random_uuid(), 'bulk', repeat('x', 150) || i, now() - i * interval '1 ms', '{}' \
         FROM generate_series(1, $1) i",
    )
    .bind(count)
    .execute(&mut connection)
    .await
    .expect("seed");
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

async fn start_export(query: &mut QueryServiceClient<Channel>) -> Streaming<ExportChunk> {
    query
        .export(ExportRequest {
            services: vec!["bulk".to_owned()],
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner()
}

/// Read connections of the server inside a transaction (an Export holds one).
async fn exporting_connections(database: &TestDatabase) -> i64 {
    database
        .scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'sluice-read' AND xact_start IS NOT NULL",
        )
        .await
}

/// 40,000 events of service `bulk` (10 MB of NDJSON) on each of the four days before today:
/// four partitions, far more than the queues between an export and a client that stops.
async fn bulk_over_four_days(database: &TestDatabase) {
    let mut connection = database.connect().await;
    sqlx::query(
        "INSERT INTO events (id, service, message, ts, metadata) \
         SELECT gen_random_uuid(), 'bulk', repeat('x', 150) || i, \
                date_trunc('day', now(), 'UTC') - d * interval '1 day' + interval '1 hour' + i * interval '10 ms', '{}' \
         FROM generate_series(1, 4) d, generate_series(1, 40000) i",
    )
    .execute(&mut connection)
    .await
    .expect("seed");
}

/// Waits until the server's reads hold `count` transactions or fewer.
async fn exporting_connections_fall_to(database: &TestDatabase, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while exporting_connections(database).await > count {
        assert!(
            Instant::now() < deadline,
            "the export still holds its connections"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What an export ends with before its last chunk: its chunks are read (none may be the
/// last) until the status.
async fn status_it_ends_with(chunks: &mut Streaming<ExportChunk>) -> tonic::Status {
    loop {
        match chunks.next().await {
            Some(Ok(chunk)) => assert!(!chunk.last, "the export went to its end"),
            Some(Err(status)) => return status,
            None => panic!("the stream ended without a status"),
        }
    }
}

/// Connections of the server's reads waiting on a lock.
async fn reads_waiting_on_a_lock(database: &TestDatabase) -> i64 {
    database
        .scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'sluice-read' AND wait_event_type = 'Lock'",
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_client_stops_reading_ends_at_the_idle_timeout_and_frees_its_connection() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_READS__EXPORT_IDLE_TIMEOUT", "1s"),
    )
    .await;
    bulk(&database, 100_000).await;
    let mut query = server.query_client().await;
    let mut chunks = start_export(&mut query).await;
    let first = chunks.next().await.expect("a first chunk").expect("ok");
    assert_eq!(first.total_events, 100_000);
    // The client reads nothing more: the export waits one idle timeout, then lets go of its
    // snapshot and connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    while exporting_connections(&database).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the export never held a connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while exporting_connections(&database).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the export still holds its connection"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What was queued reaches the client, then the reason the export ended.
    let ended = status_it_ends_with(&mut chunks).await;
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(ended.message().contains("export_idle_timeout"));
    // Query and Stats go on.
    query.stats(StatsRequest::default()).await.expect("stats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_reads_its_partitions_ahead_on_two_connections_from_the_snapshot_it_started_in() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // Room for the second connection even while the server's upkeep reads a moment.
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_DATABASE__READ_CONNECTIONS", "8"),
    )
    .await;
    bulk_over_four_days(&database).await;
    let mut connection = database.connect().await;
    let mut query = server.query_client().await;
    let mut chunks = start_export(&mut query).await;
    let first = chunks.next().await.expect("a first chunk").expect("ok");
    assert_eq!(first.total_events, 160_000);
    // The export holds its transaction and a second one in the same snapshot.
    let deadline = Instant::now() + Duration::from_secs(30);
    while exporting_connections(&database).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the export never read ahead on a second connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile the newest day loses its events and the day before gains some: neither
    // change is in the export's snapshot, whichever connection reads those days.
    sqlx::query(
        "DELETE FROM events WHERE service = 'bulk' AND ts >= date_trunc('day', now(), 'UTC') - interval '1 day'",
    )
    .execute(&mut connection)
    .await
    .expect("delete");
    sqlx::query(
        "INSERT INTO events (id, service, message, ts, metadata) \
         SELECT gen_random_uuid(), 'bulk', 'late', date_trunc('day', now(), 'UTC') - interval '2 days' + i * interval '1 s', '{}' \
         FROM generate_series(1, 100) i",
    )
    .execute(&mut connection)
    .await
    .expect("insert");
    let mut lines = first.events;
    let mut ndjson = first.ndjson;
    let mut last = first.last;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.expect("a chunk");
        lines += chunk.events;
        ndjson.extend_from_slice(&chunk.ndjson);
        last = chunk.last;
    }
    assert!(last, "the export ended without its last chunk");
    assert_eq!(lines, 160_000);
    let text = String::from_utf8(ndjson).expect("utf-8");
    assert_eq!(text.lines().count(), 160_000);
    assert!(!text.contains("\"late\""), "a row from after the snapshot");
    // Both transactions ended with the export.
    exporting_connections_fall_to(&database, 0).await;
    // In time order across the partitions.
    let times: Vec<&str> = text
        .lines()
        .map(|line| line.split("\"timestamp\" : \"").nth(1).unwrap_or_default())
        .collect();
    assert!(
        times.windows(2).all(|pair| pair[0] <= pair[1]),
        "out of order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_reading_ahead_whose_client_stops_frees_both_connections_at_the_idle_timeout() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_READS__EXPORT_IDLE_TIMEOUT", "1s")
            .env("SLUICE_DATABASE__READ_CONNECTIONS", "8"),
    )
    .await;
    bulk_over_four_days(&database).await;
    let mut query = server.query_client().await;
    let mut chunks = start_export(&mut query).await;
    let first = chunks.next().await.expect("a first chunk").expect("ok");
    assert_eq!(first.total_events, 160_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while exporting_connections(&database).await < 2 {
        assert!(Instant::now() < deadline, "the export never read ahead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client reads nothing more: one idle timeout later, both connections are free.
    exporting_connections_fall_to(&database, 0).await;
    let ended = status_it_ends_with(&mut chunks).await;
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    query.stats(StatsRequest::default()).await.expect("stats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_runs_at_most_its_share_of_exports_and_queries_at_once() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_READS__MAX_QUERIES_PER_PRINCIPAL", "2")
            .env("SLUICE_DATABASE__READ_STATEMENT_TIMEOUT", "30s"),
    )
    .await;
    bulk(&database, 100_000).await;
    let mut query = server.query_client().await;
    // Two exports the client does not read hold the principal's two export slots.
    let held = [
        start_export(&mut query).await,
        start_export(&mut query).await,
    ];
    let refused = query
        .export(ExportRequest {
            services: vec!["bulk".to_owned()],
            ..Default::default()
        })
        .await
        .expect_err("a third export");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "TOO_MANY_CALLS");
    assert!(refused.get_error_details().retry_info().is_some());
    // The client goes away: its slots come back.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match query
            .export(ExportRequest {
                services: vec!["bulk".to_owned()],
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(Instant::now() < deadline, "the slots never came back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // Two queries waiting on a lock hold the two query slots; a third is refused at once.
    let mut locker = database.connect().await;
    sqlx::query("BEGIN")
        .execute(&mut locker)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let mut client = query.clone();
            tokio::spawn(async move {
                client
                    .query(QueryRequest {
                        services: vec!["bulk".to_owned()],
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads_waiting_on_a_lock(&database).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the two queries never reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = query
        .query(QueryRequest {
            services: vec!["bulk".to_owned()],
            limit: 1,
            ..Default::default()
        })
        .await
        .expect_err("a third query");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "TOO_MANY_CALLS");
    TestDatabase::resume_writers(locker).await;
    for call in waiting {
        call.await
            .expect("task")
            .expect("answered once the lock went");
    }
    assert!(
        metric_sum(&server.metrics().await, "sluice_reads_refused_total", "") >= 2.0,
        "refusals are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_ends_once_a_reload_takes_its_scope_away() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let policy = "[[auth.principals]]\nname = \"client\"\nscopes = [\"export\", \"query\"]\n";
    let server = TestServer::start(ServerSpec::with_database(&database.url).toml(policy)).await;
    bulk(&database, 100_000).await;
    let mut query = server.query_client().await;
    let mut chunks = start_export(&mut query).await;
    chunks.next().await.expect("a first chunk").expect("ok");
    let toml = server.dir_path().join("sluice.toml");
    std::fs::write(&toml, policy.replace("\"export\", ", "")).expect("rewrite");
    let pid = nix::unistd::Pid::from_raw(server.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.logs().contains("auth policy reloaded") {
        assert!(Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = status_it_ends_with(&mut chunks).await;
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_page_stops_at_max_response_bytes_with_a_token_for_the_rest() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_READS__MAX_RESPONSE_BYTES", "65536"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let wide: Vec<Event> = (0..100)
        .map(|index| {
            let mut object = serde_json::Map::new();
            object.insert("blob".to_owned(), serde_json::json!("y".repeat(2_000)));
            Event {
                metadata: Some(object.into()),
                ..event("wide", &format!("wide {index}"))
            }
        })
        .collect();
    publish(&mut ingest, wide).await;
    let mut query = server.query_client().await;
    let request = QueryRequest {
        services: vec!["wide".to_owned()],
        limit: 10_000,
        ..Default::default()
    };
    let page = query
        .query(request.clone())
        .await
        .expect("query")
        .into_inner();
    assert!(
        page.events.len() < 40 && !page.next_page_token.is_empty(),
        "{} events in one page",
        page.events.len()
    );
    assert_eq!(
        query_all(&mut query, request).await.len(),
        100,
        "paging finds every one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_streams_are_capped_per_principal_and_a_slow_one_is_told_what_it_missed() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_READS__MAX_TAILS_PER_PRINCIPAL", "2"),
    )
    .await;
    let mut query = server.query_client().await;
    let mut slow = query
        .tail(TailRequest::default())
        .await
        .expect("tail")
        .into_inner();
    let _second = query.tail(TailRequest::default()).await.expect("tail");
    let refused = query
        .tail(TailRequest::default())
        .await
        .expect_err("a third tail");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "TOO_MANY_CALLS");

    // More than the client's flow-control windows take (about 11 MB) and than the ring holds
    // (64 batches): the subscribers that read nothing fall behind.
    let mut ingest = server.ingest_client().await;
    for round in 0..200 {
        let events = (0..4)
            .map(|index| {
                let mut object = serde_json::Map::new();
                object.insert("blob".to_owned(), serde_json::json!("z".repeat(14_000)));
                Event {
                    metadata: Some(object.into()),
                    ..event("tailed", &format!("{round}-{index}"))
                }
            })
            .collect();
        publish(&mut ingest, events).await;
    }
    let mut missed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while missed == 0 {
        let response = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("a message in time")
            .expect("a message")
            .expect("ok");
        missed = response.missed_batches;
        assert!(Instant::now() < deadline, "never told of missed batches");
    }
    assert!(
        metric_sum(
            &server.metrics().await,
            "sluice_tail_batches_missed_total",
            ""
        ) >= missed as f64
    );
}

/// A writer's batch of thousands of events reaches a subscriber in small messages, so that a
/// stream whose client stops reading holds one small message, not a whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_reaches_a_tail_subscriber_in_order_in_messages_of_at_most_128_events_and_16_kib()
 {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut query = server.query_client().await;
    let mut tail = query
        .tail(TailRequest::default())
        .await
        .expect("tail")
        .into_inner();
    let mut ingest = server.ingest_client().await;
    // 100-byte messages: 128 events would be more than 16 KiB.
    let events: Vec<Event> = (0..1_000)
        .map(|index| event("chunked", &format!("event {index:>94}")))
        .collect();
    publish(&mut ingest, events).await;
    let (mut received, mut messages) = (Vec::new(), 0);
    while received.len() < 1_000 {
        let response = tokio::time::timeout(Duration::from_secs(10), tail.next())
            .await
            .expect("a message in time")
            .expect("a message")
            .expect("ok");
        assert!(
            response.events.len() <= 128,
            "{} events",
            response.events.len()
        );
        assert!(
            response.encoded_len() <= 16 * 1024,
            "{} bytes",
            response.encoded_len()
        );
        received.extend(response.events.into_iter().map(|event| event.message));
        messages += 1;
    }
    let expected: Vec<String> = (0..1_000)
        .map(|index| format!("event {index:>94}"))
        .collect();
    assert_eq!(received, expected, "every event once, in order");
    assert!(messages >= 8, "{messages} messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_audit_row_cannot_be_written_is_refused_while_ingest_goes_on() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_WRITER__WRITE_TIMEOUT", "1s"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    publish(&mut ingest, vec![event("audited", "one")]).await;
    let mut query = server.query_client().await;
    // The audit log is locked: no row can be written.
    let mut locker = database.connect().await;
    sqlx::query("BEGIN")
        .execute(&mut locker)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let refused = query
        .query(QueryRequest {
            services: vec!["audited".to_owned()],
            ..Default::default()
        })
        .await
        .expect_err("no audit row, no events");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused), "AUDIT_UNAVAILABLE");
    // Ingest has connections of its own.
    publish(&mut ingest, vec![event("audited", "two")]).await;
    TestDatabase::resume_writers(locker).await;
    let page = query
        .query(QueryRequest {
            services: vec!["audited".to_owned()],
            ..Default::default()
        })
        .await
        .expect("audited again")
        .into_inner();
    assert_eq!(page.events.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_that_is_not_configured_has_rate_limits_by_default() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let policy = r#"
[auth]
default_scopes = ["ingest"]
default_events_per_second = 1
default_burst_events = 10

[[auth.principals]]
name = "someone-else"
scopes = ["admin"]
"#;
    let server = TestServer::start(ServerSpec::with_database(&database.url).toml(policy)).await;
    // The dev client certificate is not configured: the default grant, with its own limit.
    let mut stranger = server.ingest_client().await;
    let batch = || common::request((0..10).map(|_| event("strange", "e")).collect());
    stranger.publish(batch()).await.expect("within the burst");
    let refused = stranger
        .publish(batch())
        .await
        .expect_err("over the default rate");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "RATE_LIMITED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_lines_are_byte_for_byte_the_lines_postgresql_builds() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut connection = database.connect().await;
    let rows = [
        (
            "2026-12-01 00:00:08+00",
            "plain",
            Some("user-1"),
            r#"{"k": 1}"#,
            None,
        ),
        (
            "2026-12-01 00:00:08.1+00",
            "quotes \" and \\ and\ttabs\nnewlines\r\u{1} \u{1f} \u{8}\u{c} é ✓ \u{7f}",
            None,
            r#"{"nested": {"list": [1, "two", null, true]}, "ünï": "\"q\"\n"}"#,
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
        (
            "2026-12-01 23:59:59.000001+00",
            "",
            Some("with \"quote\""),
            "{}",
            None,
        ),
        (
            "2026-12-02 12:00:00.439201+00",
            "x",
            Some(""),
            r#"{"big": 12345678901234567890, "f": 1.50, "e": 1e400}"#,
            None,
        ),
    ];
    for (ts, message, user_id, metadata, trace_id) in rows {
        sqlx::query(
            "INSERT INTO events (id, service, message, ts, user_id, metadata, trace_id) \
             VALUES (gen_random_uuid(), 'lines', $1, $2::timestamptz, $3, $4::jsonb, $5)",
        )
        .bind(message)
        .bind(ts)
        .bind(user_id)
        .bind(metadata)
        .bind(trace_id)
        .execute(&mut connection)
        .await
        .expect("insert");
    }
    sqlx::query("SET TimeZone = 'UTC'")
        .execute(&mut connection)
        .await
        .expect("utc");
    let built_by_postgresql: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM events WHERE service = 'lines' ORDER BY ts, id",
        sluice::store::EVENT_JSON
    )))
    .fetch_all(&mut connection)
    .await
    .expect("postgresql's lines");

    let mut chunks = server
        .query_client()
        .await
        .export(ExportRequest {
            services: vec!["lines".to_owned()],
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut ndjson = Vec::new();
    while let Some(chunk) = chunks.next().await {
        ndjson.extend(chunk.expect("chunk").ndjson);
    }
    let exported: Vec<&str> = std::str::from_utf8(&ndjson)
        .expect("utf-8")
        .lines()
        .collect();
    assert_eq!(exported.len(), rows.len());
    assert_eq!(exported, built_by_postgresql);
}
