//! Search over closed partitions (`search.index_closed_partitions`, on by default): once a day
//! is over, the server indexes its partition in the background, and Query reads past days
//! through those indexes in one step each while it slices the open day. Against the real
//! server and PostgreSQL: the rows found by paging equal one unbounded SQL query, an indexed
//! step that runs out of time hands its day to slices, a build killed midway is built again,
//! and a Delete reaches what the indexes serve.

mod common;

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use common::{ServerSpec, TestDatabase, TestServer, event, metric_sum, publish};
use prost_types::{Struct, Value, value::Kind};
use sluice::proto::{
    DeleteRequest, Event, Order, QueryRequest, query_service_client::QueryServiceClient,
};
use tonic::transport::Channel;

fn at(age: TimeDelta) -> Option<prost_types::Timestamp> {
    let moment = Utc::now() - age;
    Some(prost_types::Timestamp {
        seconds: moment.timestamp(),
        nanos: moment.timestamp_subsec_nanos() as i32,
    })
}

fn kind(value: &str) -> sluice::proto::Metadata {
    Struct {
        fields: [(
            "kind".to_owned(),
            Value {
                kind: Some(Kind::StringValue(value.to_owned())),
            },
        )]
        .into(),
    }
    .into()
}

/// A server that indexes every day once it is over (no delay), checking often.
fn indexing(database: &TestDatabase) -> ServerSpec {
    indexing_or_not(database, false)
}

/// Events over the last five days, hay mostly: every 17th holds the needle (and metadata
/// `kind: needle`), in three services, with users.
fn five_days() -> Vec<Event> {
    (0..1200)
        .map(|index: i64| {
            let age = TimeDelta::minutes(index * 6 + 1);
            let needle = index % 17 == 0;
            Event {
                timestamp: at(age),
                user_id: format!("user-{}", index % 5),
                metadata: Some(kind(if needle { "needle" } else { "hay" })),
                ..event(
                    ["days-a", "days-b", "days-c"][index as usize % 3],
                    &if needle {
                        format!("found the zq-needle {index}")
                    } else {
                        format!("plain hay {index}")
                    },
                )
            }
        })
        .collect()
}

/// Closed partitions (before today, UTC) that hold rows but lack one of their valid indexes.
async fn unindexed_days(database: &TestDatabase) -> i64 {
    database
        .scalar(
            "SELECT count(*) FROM (SELECT DISTINCT tableoid FROM events \
             WHERE ts < date_trunc('day', now(), 'UTC')) p JOIN pg_class c ON c.oid = p.tableoid \
             WHERE (SELECT count(*) FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid \
                    WHERE i.indrelid = c.oid AND i.indisvalid \
                    AND x.relname::text IN (c.relname || '_msg_trgm', c.relname || '_meta_gin', \
                                            c.relname || '_user_ts')) < 3",
        )
        .await
}

/// Starts `spec`, sends [`five_days`] and waits until the closed days are indexed.
async fn five_days_indexed(database: &TestDatabase, spec: ServerSpec) -> TestServer {
    let server = TestServer::start(spec).await;
    let mut ingest = server.ingest_client().await;
    for chunk in five_days().chunks(400) {
        publish(&mut ingest, chunk.to_vec()).await;
    }
    wait_for_indexes(database, &server).await;
    server
}

async fn wait_for_indexes(database: &TestDatabase, server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while unindexed_days(database).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the closed days were never indexed:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every id a query finds, following its tokens.
async fn page_through(
    query: &mut QueryServiceClient<Channel>,
    request: QueryRequest,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut request = request;
    for _ in 0..10_000 {
        let page = query
            .query(request.clone())
            .await
            .expect("page")
            .into_inner();
        ids.extend(page.events.iter().map(|event| event.id.clone()));
        if page.next_page_token.is_empty() {
            return ids;
        }
        request.page_token = page.next_page_token;
    }
    panic!("paging never ends");
}

/// The ids one unbounded SQL query finds, within the time range of `request` when it has one
/// (bound as `$1` and `$2`, which `condition` need not name).
async fn ids_in_order(
    database: &TestDatabase,
    condition: &str,
    order: &str,
    request: &QueryRequest,
) -> Vec<String> {
    let instant = |timestamp: &Option<prost_types::Timestamp>| {
        timestamp.as_ref().map(|timestamp| {
            chrono::DateTime::from_timestamp(timestamp.seconds, timestamp.nanos as u32)
                .expect("timestamp")
        })
    };
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id::text FROM events WHERE {condition} \
         AND ($1::timestamptz IS NULL OR ts >= $1) AND ($2::timestamptz IS NULL OR ts < $2) \
         ORDER BY ts {order}, id {order}"
    )))
    .bind(instant(&request.start_time))
    .bind(instant(&request.end_time))
    .fetch_all(&mut database.connect().await)
    .await
    .expect("unbounded query")
}

/// The ids of `zq-needle` events that paging `request` (newest first) finds, and those one
/// unbounded SQL query finds.
async fn needles_paged_and_stored(
    query: &mut QueryServiceClient<Channel>,
    database: &TestDatabase,
    request: &QueryRequest,
) -> (Vec<String>, Vec<String>) {
    let paged = page_through(query, request.clone()).await;
    let stored = ids_in_order(
        database,
        "strpos(message, 'zq-needle') > 0",
        "DESC",
        request,
    )
    .await;
    (paged, stored)
}

async fn steps(server: &TestServer, step: &str) -> f64 {
    metric_sum(
        &server.metrics().await,
        "sluice_search_steps_total",
        &format!("step=\"{step}\""),
    )
}

/// Searches past days until a step went through an index: the server reads which days are
/// indexed right after it builds them, so this is at most a few calls.
async fn until_indexed(server: &TestServer, query: &mut QueryServiceClient<Channel>) {
    let past = QueryRequest {
        message_contains: "zq-needle".to_owned(),
        start_time: at(TimeDelta::hours(100)),
        end_time: at(TimeDelta::hours(30)),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while steps(server, "indexed").await == 0.0 {
        assert!(Instant::now() < deadline, "no step read an index");
        query.query(past.clone()).await.expect("query");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_days_are_indexed_and_searches_through_them_page_exactly_like_one_unbounded_query() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = five_days_indexed(&database, indexing(&database)).await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    let needle = QueryRequest {
        message_contains: "zq-needle".to_owned(),
        limit: 7,
        ..Default::default()
    };
    until_indexed(&server, &mut query).await;

    // Ingest goes on meanwhile: more hay today, and late hay into indexed days, which their
    // indexes take in as it lands.
    let mut writer = server.ingest_client().await;
    let background = tokio::spawn(async move {
        for round in 0..20i64 {
            let events = (0..20)
                .map(|index| Event {
                    timestamp: at(if index % 4 == 0 {
                        TimeDelta::hours(30 + round)
                    } else {
                        TimeDelta::seconds(round * 20 + index)
                    }),
                    metadata: Some(kind("hay")),
                    ..event("days-b", &format!("more hay {round}-{index}"))
                })
                .collect();
            writer
                .publish(common::request(events))
                .await
                .expect("publish");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let shapes = [
        (needle.clone(), "strpos(message, 'zq-needle') > 0"),
        (
            QueryRequest {
                message_contains: String::new(),
                metadata_contains: Some(kind("needle")),
                ..needle.clone()
            },
            "metadata @> '{\"kind\": \"needle\"}'",
        ),
        (
            QueryRequest {
                services: vec!["days-a".to_owned()],
                ..needle.clone()
            },
            "service = 'days-a' AND strpos(message, 'zq-needle') > 0",
        ),
        (
            QueryRequest {
                metadata_contains: Some(kind("needle")),
                start_time: at(TimeDelta::hours(80)),
                end_time: at(TimeDelta::hours(20)),
                ..needle.clone()
            },
            "strpos(message, 'zq-needle') > 0 AND metadata @> '{\"kind\": \"needle\"}'",
        ),
        // A user's events and a service's, which their B-trees serve in page order.
        (
            QueryRequest {
                message_contains: String::new(),
                user_id: "user-2".to_owned(),
                ..needle.clone()
            },
            "user_id = 'user-2'",
        ),
        (
            QueryRequest {
                message_contains: String::new(),
                services: vec!["days-b".to_owned()],
                limit: 100,
                ..needle.clone()
            },
            "service = 'days-b'",
        ),
    ];
    for (request, condition) in &shapes {
        for (order, sql) in [(Order::NewestFirst, "DESC"), (Order::OldestFirst, "ASC")] {
            let request = QueryRequest {
                order: order as i32,
                ..request.clone()
            };
            let paged = page_through(&mut query, request.clone()).await;
            assert!(!paged.is_empty(), "{condition}: found some");
            let expected = ids_in_order(&database, condition, sql, &request).await;
            assert_eq!(paged, expected, "{condition} {order:?}: no skip, no repeat");
        }
    }
    background.await.expect("background ingest");
    // A closed day's page of a user is an ordered walk of its `(user_id, ts, id)` index.
    let mut connection = database.connect().await;
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut connection)
        .await
        .expect("set");
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id FROM events WHERE user_id = 'user-2' \
         AND ts < date_trunc('day', now(), 'UTC') ORDER BY ts DESC, id DESC LIMIT 8",
    )
    .fetch_all(&mut connection)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(plan.contains("_user_ts"), "{plan}");

    // Needles that arrive late, into days already indexed, are found through the index.
    let late: Vec<Event> = (0..6)
        .map(|index| Event {
            timestamp: at(TimeDelta::hours(26 + index * 9)),
            ..event("days-c", &format!("late zq-needle {index}"))
        })
        .collect();
    publish(&mut ingest, late).await;
    let indexed_before = steps(&server, "indexed").await;
    let (paged, expected) = needles_paged_and_stored(&mut query, &database, &needle).await;
    assert_eq!(paged.len(), 1200 / 17 + 1 + 6);
    assert_eq!(paged, expected, "late needles included");
    assert!(steps(&server, "indexed").await > indexed_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexed_step_past_the_budget_hands_its_day_to_slices_and_paging_still_finds_every_row()
{
    common::init_crypto();
    let database = TestDatabase::create().await;
    // A budget far above a step's cost: only the lock below makes a step run out of it.
    let server = five_days_indexed(
        &database,
        indexing(&database)
            .env("SLUICE_SEARCH__MAX_SCAN_TIME", "500ms")
            .env("SLUICE_DATABASE__READ_STATEMENT_TIMEOUT", "20s"),
    )
    .await;
    let mut query = server.query_client().await;
    // A range wholly inside indexed days: without a fallback, no step of it would be sliced.
    let request = QueryRequest {
        message_contains: "zq-needle".to_owned(),
        start_time: at(TimeDelta::hours(70)),
        end_time: at(TimeDelta::hours(30)),
        limit: 500,
        ..Default::default()
    };
    until_indexed(&server, &mut query).await;
    let cancelled = || async {
        metric_sum(
            &server.metrics().await,
            "sluice_search_steps_cancelled_total",
            "",
        )
    };
    let cancelled_before = cancelled().await;

    // The day of a needle 47.6 hours old is held in ACCESS EXCLUSIVE mode (as a retention
    // drop would): its indexed step waits, and PostgreSQL cancels it at the budget.
    let mut locker = database.connect().await;
    common::lock_partition_of(&mut locker, "found the zq-needle 476").await;
    let first = query
        .query(request.clone())
        .await
        .expect("first page")
        .into_inner();
    TestDatabase::resume_writers(locker).await;
    assert!(
        !first.next_page_token.is_empty(),
        "a partial page and a token"
    );
    assert_eq!(cancelled().await, cancelled_before + 1.0);

    // The rest reads that day in slices (the token says so), then the older day by its index.
    let sliced_before = steps(&server, "sliced").await;
    let rest = page_through(
        &mut query,
        QueryRequest {
            page_token: first.next_page_token,
            ..request.clone()
        },
    )
    .await;
    assert!(
        steps(&server, "sliced").await > sliced_before,
        "the day went to slices"
    );
    let paged: Vec<String> = first
        .events
        .iter()
        .map(|event| event.id.clone())
        .chain(rest)
        .collect();
    let expected = ids_in_order(
        &database,
        "strpos(message, 'zq-needle') > 0",
        "DESC",
        &request,
    )
    .await;
    assert!(expected.len() > 5, "{expected:?}");
    assert_eq!(paged, expected, "no skip, no repeat");
}

/// A server that indexes every day once it is over, or never within the test (`never`).
fn indexing_or_not(database: &TestDatabase, never: bool) -> ServerSpec {
    ServerSpec::with_database(&database.url)
        .env("SLUICE_RETENTION__DEFAULT", "90days")
        .env(
            "SLUICE_SEARCH__INDEX_DELAY",
            if never { "60days" } else { "0s" },
        )
        .env("SLUICE_SEARCH__INDEX_CHECK_INTERVAL", "200ms")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_day_index_build_killed_midway_is_built_again_and_a_delete_reaches_what_it_serves()
{
    common::init_crypto();
    let database = TestDatabase::create().await;
    let unindexing = TestServer::start(indexing_or_not(&database, true)).await;
    let mut ingest = unindexing.ingest_client().await;
    for chunk in five_days().chunks(400) {
        publish(&mut ingest, chunk.to_vec()).await;
    }
    let secret: Vec<Event> = (0..5)
        .map(|index| Event {
            timestamp: at(TimeDelta::hours(40 + index)),
            user_id: "forget-me".to_owned(),
            ..event("days-a", &format!("zq-secret of forget-me {index}"))
        })
        .collect();
    publish(&mut ingest, secret).await;
    drop(ingest);
    drop(unindexing);

    // A reader holding an old snapshot makes CREATE INDEX CONCURRENTLY wait at its very end,
    // with its index in the catalog but not valid: the node is killed there.
    let mut blocker = database.connect().await;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut blocker)
        .await
        .expect("begin");
    sqlx::query("SELECT count(*) FROM audit_log")
        .execute(&mut blocker)
        .await
        .expect("snapshot");
    let mut building = TestServer::start(indexing_or_not(&database, false)).await;
    let invalid = "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                   WHERE NOT i.indisvalid AND c.relname ~ '^events_p[0-9_]+_(msg_trgm|meta_gin)$'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while database.scalar(invalid).await == 0 {
        assert!(
            Instant::now() < deadline,
            "no build started:\n{}",
            building.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    building.kill_hard();
    // The killed node's backend would finish alone; PostgreSQL ends it once it finds the
    // client gone, as here.
    database
        .scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while database
        .scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'",
        )
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "the build's backend did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    TestDatabase::resume_writers(blocker).await;
    assert!(
        database.scalar(invalid).await > 0,
        "the cut build left its invalid index"
    );

    // The next node drops it, builds every index, and searches read through them.
    let server = TestServer::start(indexing_or_not(&database, false)).await;
    wait_for_indexes(&database, &server).await;
    assert_eq!(database.scalar(invalid).await, 0);
    let mut query = server.query_client().await;
    let needle = QueryRequest {
        message_contains: "zq-needle".to_owned(),
        limit: 9,
        ..Default::default()
    };
    until_indexed(&server, &mut query).await;
    let (paged, expected) = needles_paged_and_stored(&mut query, &database, &needle).await;
    assert_eq!(paged, expected);

    // A Delete reaches what the indexes serve.
    let secret = QueryRequest {
        message_contains: "zq-secret".to_owned(),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(page_through(&mut query, secret.clone()).await.len(), 5);
    let deleted = query
        .delete(DeleteRequest {
            user_id: "forget-me".to_owned(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.deleted, 5);
    let indexed_before = steps(&server, "indexed").await;
    assert!(page_through(&mut query, secret).await.is_empty());
    assert!(steps(&server, "indexed").await > indexed_before);
}
