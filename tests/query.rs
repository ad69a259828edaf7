//! The read side against the real server: Query filters and pagination, Export, Delete
//! (right to be forgotten) and Stats.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use chrono::{TimeDelta, Utc};
use common::{ServerSpec, TestDatabase, TestServer, event, query_all};
use prost_types::{Struct, Value, value::Kind};
use sluice::proto::{
    DeleteRequest, Event, ExportRequest, IngestRequest, Order, QueryRequest, StatsRequest,
    ingest_service_client::IngestServiceClient, query_service_client::QueryServiceClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

fn at(age: TimeDelta) -> Option<prost_types::Timestamp> {
    let moment = Utc::now() - age;
    Some(prost_types::Timestamp {
        seconds: moment.timestamp(),
        nanos: moment.timestamp_subsec_nanos() as i32,
    })
}

fn text(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

/// A Struct field as the generated types hold it.
fn metadata(fields: &[(&str, Value)]) -> sluice::proto::Metadata {
    object(fields).into()
}

fn object(fields: &[(&str, Value)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect(),
    }
}

fn nested(value: Struct) -> Value {
    Value {
        kind: Some(Kind::StructValue(value)),
    }
}

async fn publish(client: &mut IngestServiceClient<Channel>, events: Vec<Event>) {
    for chunk in events.chunks(1000) {
        let response = client
            .publish(common::request(chunk.to_vec()))
            .await
            .expect("publish");
        assert_eq!(response.into_inner().rejected, 0);
    }
}

/// The first `wanted` events of a query, following page tokens: a scanned page may be
/// partial, or empty, with a token, however fast the machine is.
async fn first_events(
    client: &mut QueryServiceClient<Channel>,
    request: QueryRequest,
    wanted: usize,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    while events.len() < wanted {
        let page = client
            .query(QueryRequest {
                page_token,
                ..request.clone()
            })
            .await
            .expect("query")
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    events.truncate(wanted);
    events
}

fn messages(events: &[Event]) -> Vec<String> {
    let mut messages: Vec<String> = events.iter().map(|event| event.message.clone()).collect();
    messages.sort();
    messages
}

/// A mixed data set: services, users, nested metadata, spread over the last 40 hours.
fn fixture() -> Vec<Event> {
    let mut events = Vec::new();
    for index in 0..60usize {
        let service = ["checkout", "billing", "search"][index % 3];
        let user = format!("user-{}", index % 4);
        let region = ["eu", "us"][index % 2];
        let metadata = object(&[
            ("region", text(region)),
            (
                "http",
                nested(object(&[(
                    "status",
                    text(if index % 5 == 0 { "500" } else { "200" }),
                )])),
            ),
        ]);
        events.push(Event {
            service: service.to_owned(),
            message: format!(
                "{service} event {index:02} {}",
                if index % 7 == 0 { "timeout" } else { "ok" }
            ),
            timestamp: at(TimeDelta::minutes(40 * index as i64)),
            user_id: user,
            metadata: Some(metadata.into()),
            ..event("x", "x")
        });
    }
    events
}

async fn start() -> (
    TestDatabase,
    TestServer,
    IngestServiceClient<Channel>,
    QueryServiceClient<Channel>,
) {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // 90 days of retention, so that data sets can span two months on any day of the month.
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_RETENTION__DEFAULT", "90days"),
    )
    .await;
    let ingest = server.ingest_client().await;
    let query = server.query_client().await;
    (database, server, ingest, query)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_and_their_combinations_select_exactly_the_matching_events() {
    let (_database, _server, mut ingest, mut query) = start().await;
    let all = fixture();
    publish(&mut ingest, all.clone()).await;
    let expect = |predicate: &dyn Fn(usize, &Event) -> bool| -> Vec<String> {
        let chosen: Vec<Event> = all
            .iter()
            .enumerate()
            .filter(|(index, event)| predicate(*index, event))
            .map(|(_, event)| event.clone())
            .collect();
        messages(&chosen)
    };

    let by_service = query_all(
        &mut query,
        QueryRequest {
            services: vec!["billing".to_owned()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        messages(&by_service),
        expect(&|_, event| event.service == "billing")
    );

    let two_services = QueryRequest {
        services: vec!["billing".to_owned(), "search".to_owned()],
        ..Default::default()
    };
    assert_eq!(
        messages(&query_all(&mut query, two_services).await),
        expect(&|_, event| event.service != "checkout")
    );

    let by_user = query_all(
        &mut query,
        QueryRequest {
            user_id: "user-1".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        messages(&by_user),
        expect(&|_, event| event.user_id == "user-1")
    );
    assert!(
        by_user
            .iter()
            .all(|event| event.ingested_at.is_some() && event.metadata.is_some())
    );

    let window = QueryRequest {
        start_time: at(TimeDelta::hours(10)),
        end_time: at(TimeDelta::hours(5)),
        ..Default::default()
    };
    let in_window = query_all(&mut query, window).await;
    // Events are 40 minutes apart starting now: ages 5h20 … 9h20 fall in [now-10h, now-5h).
    assert_eq!(
        messages(&in_window),
        expect(&|index, _| (8..=14).contains(&index))
    );

    let timeouts = QueryRequest {
        message_contains: "timeout".to_owned(),
        ..Default::default()
    };
    assert_eq!(
        messages(&query_all(&mut query, timeouts).await),
        expect(&|index, _| index % 7 == 0)
    );

    let combined = QueryRequest {
        services: vec!["checkout".to_owned()],
        user_id: "user-0".to_owned(),
        metadata_contains: Some(metadata(&[("region", text("eu"))])),
        ..Default::default()
    };
    assert_eq!(
        messages(&query_all(&mut query, combined).await),
        expect(&|index, event| event.service == "checkout" && index % 4 == 0 && index % 2 == 0)
    );

    // Newest first by default, oldest first on request.
    let newest = first_events(
        &mut query,
        QueryRequest {
            limit: 3,
            ..Default::default()
        },
        1,
    )
    .await;
    assert_eq!(newest[0].message, all[0].message);
    let oldest = first_events(
        &mut query,
        QueryRequest {
            limit: 1,
            order: Order::OldestFirst as i32,
            ..Default::default()
        },
        1,
    )
    .await;
    assert_eq!(oldest[0].message, all[59].message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_containment_matches_nested_objects() {
    let (_database, _server, mut ingest, mut query) = start().await;
    let all = fixture();
    publish(&mut ingest, all.clone()).await;
    let errors = QueryRequest {
        metadata_contains: Some(metadata(&[(
            "http",
            nested(object(&[("status", text("500"))])),
        )])),
        ..Default::default()
    };
    let found = query_all(&mut query, errors).await;
    let expected: Vec<Event> = all
        .iter()
        .enumerate()
        .filter(|(index, _)| index % 5 == 0)
        .map(|(_, event)| event.clone())
        .collect();
    assert_eq!(messages(&found), messages(&expected));
    let both = QueryRequest {
        metadata_contains: Some(metadata(&[
            ("region", text("us")),
            ("http", nested(object(&[("status", text("500"))]))),
        ])),
        ..Default::default()
    };
    let found = query_all(&mut query, both).await;
    assert_eq!(
        found.len(),
        all.iter()
            .enumerate()
            .filter(|(index, _)| index % 5 == 0 && index % 2 == 1)
            .count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_strings_in_text_filters_are_treated_as_data() {
    let (database, _server, mut ingest, mut query) = start().await;
    let hostile = "x' OR '1'='1'; DROP TABLE events; --";
    let mut events = fixture();
    events[0].user_id = hostile.to_owned();
    events[1].message = format!("contains {hostile} and 100% _wild_");
    publish(&mut ingest, events).await;

    let by_user = query_all(
        &mut query,
        QueryRequest {
            user_id: hostile.to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_user.len(), 1);
    let by_message = query_all(
        &mut query,
        QueryRequest {
            message_contains: "100% _wild_".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_message.len(), 1, "LIKE wildcards are literal");
    let nothing = query_all(
        &mut query,
        QueryRequest {
            message_contains: "%".to_owned(),
            user_id: "' OR 1=1 --".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert!(nothing.is_empty());
    let metadata = QueryRequest {
        metadata_contains: Some(metadata(&[("region", text("eu' OR '1'='1"))])),
        ..Default::default()
    };
    assert!(query_all(&mut query, metadata).await.is_empty());
    let status = query
        .query(QueryRequest {
            services: vec![hostile.to_owned()],
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = query
        .query(QueryRequest {
            page_token: hostile.to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        database.scalar("SELECT count(*) FROM events").await,
        60,
        "the table is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_under_concurrent_ingest_neither_skips_nor_repeats() {
    let (_database, server, mut ingest, mut query) = start().await;
    let existing: Vec<Event> = (0..3000)
        .map(|index| Event {
            timestamp: at(TimeDelta::seconds(index * 7 % 80_000)),
            ..event("paged", &format!("old {index}"))
        })
        .collect();
    publish(&mut ingest, existing.clone()).await;

    // Keep ingesting, with timestamps spread over the same range, while paging.
    let mut writer = server.ingest_client().await;
    let background = tokio::spawn(async move {
        for round in 0..40 {
            let events = (0..50)
                .map(|index| Event {
                    timestamp: at(TimeDelta::seconds((round * 50 + index) * 13 % 80_000)),
                    ..event("paged", &format!("new {round}-{index}"))
                })
                .collect();
            writer
                .publish(common::request(events))
                .await
                .expect("publish");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    for order in [Order::NewestFirst, Order::OldestFirst] {
        let mut seen = HashSet::new();
        let mut previous: Option<(i64, i32, String)> = None;
        let mut page_token = String::new();
        loop {
            let request = QueryRequest {
                services: vec!["paged".to_owned()],
                limit: 137,
                order: order as i32,
                page_token,
                ..Default::default()
            };
            let page = query.query(request).await.expect("page").into_inner();
            for event in &page.events {
                assert!(seen.insert(event.id.clone()), "event {} repeated", event.id);
                let timestamp = event.timestamp.expect("timestamp");
                let key = (timestamp.seconds, timestamp.nanos, event.id.clone());
                if let Some(previous) = &previous {
                    let ordered = if order == Order::NewestFirst {
                        &key < previous
                    } else {
                        &key > previous
                    };
                    assert!(ordered, "order broken");
                }
                previous = Some(key);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let existing_ids: HashSet<String> = existing.iter().map(|event| event.id.clone()).collect();
        assert!(
            existing_ids.is_subset(&seen),
            "{} pre-existing events skipped",
            existing_ids.difference(&seen).count()
        );
    }
    background.await.expect("background ingest");
}

/// Pages of `request` until the token is empty: (ids in order, pages, partial pages with a token).
async fn page_through(
    query: &mut QueryServiceClient<Channel>,
    request: QueryRequest,
) -> (Vec<String>, usize, usize) {
    let mut ids = Vec::new();
    let (mut pages, mut partial) = (0, 0);
    let mut page_token = request.page_token.clone();
    loop {
        let page = query
            .query(QueryRequest {
                page_token,
                ..request.clone()
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        ids.extend(page.events.iter().map(|event| event.id.clone()));
        if page.next_page_token.is_empty() {
            return (ids, pages, partial);
        }
        assert!(
            page.scanned_until.is_some(),
            "a page with a token says how far it scanned"
        );
        if page.events.len() < request.limit as usize {
            partial += 1;
        }
        page_token = page.next_page_token;
        assert!(pages < 10_000, "paging never ends");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_sliced_scan_pages_exactly_the_rows_of_one_unbounded_query_while_ingest_runs() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // Small slices and scan time: calls stop early, so paging crosses many partial pages.
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_RETENTION__DEFAULT", "90days")
            .env("SLUICE_SEARCH__SLICE", "2h")
            .env("SLUICE_SEARCH__MAX_SCAN_TIME", "20ms"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    // A day of events across services; the matches are in its first and last two hours only,
    // so the scan crosses twenty hours of slices that hold none.
    let needle = |age: i64| !(7_200..79_200).contains(&age);
    let events: Vec<Event> = (0..1500)
        .map(|index| {
            let age = index * 113 % 86_400;
            Event {
                timestamp: at(TimeDelta::seconds(age)),
                ..event(
                    ["scan-a", "scan-b", "scan-c"][index as usize % 3],
                    &if needle(age) {
                        format!("needle {index}")
                    } else {
                        format!("hay {index}")
                    },
                )
            }
        })
        .collect();
    let needles = events
        .iter()
        .filter(|event| event.message.starts_with("needle"))
        .count();
    let scan_a_needles = events
        .iter()
        .filter(|event| event.message.starts_with("needle") && event.service == "scan-a")
        .count();
    publish(&mut ingest, events).await;
    // Ingest keeps running (more hay, over the same range) while the scans page.
    let mut writer = server.ingest_client().await;
    let background = tokio::spawn(async move {
        for round in 0..30 {
            let events = (0..40)
                .map(|index| Event {
                    timestamp: at(TimeDelta::seconds((round * 40 + index) * 97 % 86_400)),
                    ..event("scan-b", &format!("more hay {round}-{index}"))
                })
                .collect();
            writer
                .publish(common::request(events))
                .await
                .expect("publish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    for (order, sql_order) in [(Order::NewestFirst, "DESC"), (Order::OldestFirst, "ASC")] {
        let request = QueryRequest {
            message_contains: "needle".to_owned(),
            limit: 23,
            order: order as i32,
            ..Default::default()
        };
        // The first call is bounded whatever the machine's speed: its first step waits on a
        // lock of every partition and is cancelled at the budget, so it answers a partial
        // page with a token. The writers wait on the lock meanwhile and go on after it.
        let mut locker = database.connect().await;
        sqlx::query("BEGIN")
            .execute(&mut locker)
            .await
            .expect("begin");
        sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .execute(&mut locker)
            .await
            .expect("lock");
        let first = query
            .query(request.clone())
            .await
            .expect("first page")
            .into_inner();
        TestDatabase::resume_writers(locker).await;
        assert!(
            first.events.len() < request.limit as usize && !first.next_page_token.is_empty(),
            "{order:?}: a step cancelled at the budget ends the call with a partial page and a token"
        );
        let (rest, pages, _) = page_through(
            &mut query,
            QueryRequest {
                page_token: first.next_page_token.clone(),
                ..request.clone()
            },
        )
        .await;
        let paged: Vec<String> = first
            .events
            .iter()
            .map(|event| event.id.clone())
            .chain(rest)
            .collect();
        let expected: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id::text FROM events WHERE strpos(message, 'needle') > 0 \
             ORDER BY ts {sql_order}, id {sql_order}"
        )))
        .fetch_all(&mut database.connect().await)
        .await
        .expect("unbounded query");
        assert_eq!(expected.len(), needles);
        assert_eq!(
            paged, expected,
            "{order:?}: same rows, same order, no skip, no repeat"
        );
        assert!(pages > 1, "{order:?}: paging went on from the token");
    }
    // A service filter with a content filter is scanned the same way; without one it is not.
    let (paged, _, _) = page_through(
        &mut query,
        QueryRequest {
            services: vec!["scan-a".to_owned()],
            message_contains: "needle".to_owned(),
            limit: 50,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(paged.len(), scan_a_needles);
    background.await.expect("background ingest");
}

async fn export_all(
    query: &mut QueryServiceClient<Channel>,
    request: ExportRequest,
) -> (u64, Vec<serde_json::Value>) {
    let mut chunks = query.export(request).await.expect("export").into_inner();
    let first = chunks.next().await.expect("first chunk").expect("ok");
    let total = first.total_events;
    let mut bytes = first.ndjson;
    let mut last = first.last;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.expect("chunk");
        assert!(!last, "nothing after the last chunk");
        assert!(
            chunk.ndjson.is_empty() || chunk.ndjson.ends_with(b"\n"),
            "lines never straddle chunks"
        );
        bytes.extend(chunk.ndjson);
        last = chunk.last;
    }
    assert!(last, "the stream ends with a chunk marked last");
    let text = String::from_utf8(bytes).expect("utf-8");
    let lines = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect();
    (total, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_a_user_is_exactly_that_users_events_as_ndjson() {
    let (_database, _server, mut ingest, mut query) = start().await;
    let all = fixture();
    publish(&mut ingest, all.clone()).await;
    let (total, lines) = export_all(
        &mut query,
        ExportRequest {
            user_id: "user-2".to_owned(),
            ..Default::default()
        },
    )
    .await;
    let expected: HashSet<String> = all
        .iter()
        .filter(|event| event.user_id == "user-2")
        .map(|event| event.id.clone())
        .collect();
    let exported: HashSet<String> = lines
        .iter()
        .map(|line| line["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(exported, expected);
    assert_eq!(total as usize, expected.len());
    assert!(
        lines
            .iter()
            .all(|line| line["user_id"] == "user-2" && line["metadata"]["region"].is_string())
    );

    let (total, lines) = export_all(
        &mut query,
        ExportRequest {
            user_id: "nobody".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((total, lines.len()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_by_user_removes_every_partition_dead_letters_and_buffered_events_and_dry_run_keeps_them()
 {
    let (database, _server, mut ingest, mut query) = start().await;
    let doomed = "forget-me";
    let mut events: Vec<Event> = (0..40)
        .map(|index| Event {
            user_id: doomed.to_owned(),
            // Up to 59 days back: at least two monthly partitions, whatever today is.
            timestamp: at(TimeDelta::days(index % 60)),
            ..event("gdpr", &format!("mine {index}"))
        })
        .collect();
    events.extend((0..10).map(|index| Event {
        user_id: "keep-me".to_owned(),
        ..event("gdpr", &format!("theirs {index}"))
    }));
    // One of the user's events is refused by PostgreSQL and lands in dead letters.
    events.push(Event {
        user_id: doomed.to_owned(),
        ..event("gdpr", "nul \0 here")
    });
    let response = common::publish(&mut ingest, events).await;
    assert_eq!((response.accepted, response.rejected), (50, 1));
    let partitions = database
        .scalar("SELECT count(DISTINCT tableoid) FROM events WHERE user_id = 'forget-me'")
        .await;
    assert!(
        partitions >= 2,
        "the user's events span {partitions} partitions"
    );

    let dry = query
        .delete(DeleteRequest {
            user_id: doomed.to_owned(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(
        (dry.deleted, dry.dead_letters_deleted, dry.dry_run),
        (40, 1, true)
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'forget-me'")
            .await,
        40,
        "dry run deletes nothing"
    );

    // Events accepted just before the call, still in the buffer (writers stalled), go too.
    let blocker = database.stall_writers().await;
    let mut late_client = ingest.clone();
    let late = tokio::spawn(async move {
        let events = (0..5)
            .map(|index| Event {
                user_id: "forget-me".to_owned(),
                ..event("gdpr", &format!("late {index}"))
            })
            .collect();
        late_client
            .publish(common::request(events))
            .await
            .expect("late publish")
            .into_inner()
    });
    // The late events are in the buffer (Stats reads it live) before the Delete starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = query
            .stats(sluice::proto::StatsRequest::default())
            .await
            .expect("stats")
            .into_inner();
        if stats.buffer.is_some_and(|buffer| buffer.events >= 5) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late events never reached the buffer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut delete_client = query.clone();
    let deletion = tokio::spawn(async move {
        delete_client
            .delete(DeleteRequest {
                user_id: "forget-me".to_owned(),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    TestDatabase::resume_writers(blocker).await;
    assert_eq!(late.await.expect("late").accepted, 5);
    let deleted = deletion
        .await
        .expect("delete task")
        .expect("delete")
        .into_inner();
    assert_eq!((deleted.deleted, deleted.dead_letters_deleted), (45, 1));

    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'forget-me'")
            .await,
        0
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM dead_letters WHERE user_id = 'forget-me'")
            .await,
        0
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'keep-me'")
            .await,
        10
    );
    assert!(
        query_all(
            &mut query,
            QueryRequest {
                user_id: doomed.to_owned(),
                ..Default::default()
            }
        )
        .await
        .is_empty()
    );
    let (total, _) = export_all(
        &mut query,
        ExportRequest {
            user_id: doomed.to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(total, 0);
    let stats = query
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.total_events, 10, "the rollup follows deletes");

    let status = query
        .delete(DeleteRequest::default())
        .await
        .expect_err("empty filter");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_agree_with_the_stored_rows_after_a_mixed_ingest() {
    let (database, _server, mut ingest, mut query) = start().await;
    let mut events = fixture();
    events.extend((0..30).map(|index| Event {
        timestamp: at(TimeDelta::days(3)),
        ..event("batch", &format!("older {index}"))
    }));
    publish(&mut ingest, events.clone()).await;
    // Duplicates and invalid events must not move the counts.
    publish(&mut ingest, events[..20].to_vec()).await;
    let invalid = ingest
        .publish(IngestRequest {
            events: vec![Event {
                service: "BAD".to_owned(),
                ..event("x", "bad")
            }],
            sequence: 0,
        })
        .await;
    assert_eq!(invalid.expect("publish").into_inner().rejected, 1);

    let stats = query
        .stats(StatsRequest {
            top_n: 2,
            trend_hours: 48,
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    let mut connection = database.connect().await;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT service, count(*) FROM events GROUP BY service")
            .fetch_all(&mut connection)
            .await
            .expect("counts");
    let actual: BTreeMap<String, u64> = rows
        .into_iter()
        .map(|(service, count)| (service, count as u64))
        .collect();
    let reported: BTreeMap<String, u64> = stats
        .services
        .iter()
        .map(|service| (service.service.clone(), service.total))
        .collect();
    assert_eq!(reported, actual);
    assert_eq!(stats.total_events, 90);
    let recent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE ts >= date_trunc('hour', now()) - interval '23 hours'",
    )
    .fetch_one(&mut connection)
    .await
    .expect("recent");
    assert_eq!(
        stats
            .services
            .iter()
            .map(|service| service.last_24h)
            .sum::<u64>(),
        recent as u64
    );
    assert_eq!(stats.hourly.len(), 48);
    let in_trend: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE ts >= date_trunc('hour', now()) - interval '47 hours'",
    )
    .fetch_one(&mut connection)
    .await
    .expect("trend");
    assert_eq!(
        stats.hourly.iter().map(|hour| hour.events).sum::<u64>(),
        in_trend as u64
    );
    assert_eq!(stats.top_services.len(), 2);
    let ingest_counters = stats.ingest.expect("ingest counters");
    assert_eq!(ingest_counters.duplicates, 20);
    assert_eq!(
        ingest_counters.rejected_by_reason.get("invalid_service"),
        Some(&1)
    );
    let buffer = stats.buffer.expect("buffer");
    assert_eq!(buffer.max_events, 50_000);
    assert_eq!(stats.writer.expect("writer").circuit, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_read_replica_reads_go_to_it_and_writes_stay_on_the_primary() {
    common::init_crypto();
    // A stand-in for a streaming replica: another database, migrated and filled by a first server.
    let replica = TestDatabase::create().await;
    {
        let seeding = TestServer::start(ServerSpec::with_database(&replica.url)).await;
        let mut client = seeding.ingest_client().await;
        publish(&mut client, vec![event("replica", "only on the replica")]).await;
    }
    let primary = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&primary.url).env("SLUICE_READ_DATABASE_URL", &replica.url),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    publish(
        &mut ingest,
        vec![event("primary", "written to the primary")],
    )
    .await;

    let read = query_all(&mut query, QueryRequest::default()).await;
    assert_eq!(
        messages(&read),
        ["only on the replica"],
        "Query reads the replica"
    );
    let stats = query
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(
        stats
            .services
            .iter()
            .map(|service| service.service.as_str())
            .collect::<Vec<_>>(),
        ["replica"]
    );
    assert_eq!(
        primary
            .scalar("SELECT count(*) FROM events WHERE service = 'primary'")
            .await,
        1,
        "ingest writes the primary"
    );
    assert!(server.logs().contains("reads go to the read replica"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_step_that_runs_past_the_budget_is_cancelled_and_the_call_returns_its_partial_page()
{
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_RETENTION__DEFAULT", "90days")
            // Week-long slices reach the old partition in the call's second or third step, and
            // a budget far above a step's cost lets them get there on any machine.
            .env("SLUICE_SEARCH__SLICE", "7days")
            .env("SLUICE_SEARCH__MAX_SCAN_TIME", "2s")
            .env("SLUICE_DATABASE__READ_STATEMENT_TIMEOUT", "20s"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    // Matches a minute old and 45 days old: always two different monthly partitions.
    let events = (0..20)
        .map(|index| Event {
            timestamp: at(TimeDelta::seconds(60 + index)),
            ..event("budget", &format!("recent needle {index}"))
        })
        .chain((0..20).map(|index| Event {
            timestamp: at(TimeDelta::days(45) + TimeDelta::seconds(index)),
            ..event("budget", &format!("old needle {index}"))
        }))
        .collect();
    publish(&mut ingest, events).await;
    // A migration or a retention drop holding the old partition: a step that reaches it waits
    // on the lock, as it would on any slow plan.
    let mut locker = database.connect().await;
    common::lock_partition_of(&mut locker, "old needle 0").await;
    let request = QueryRequest {
        message_contains: "needle".to_owned(),
        limit: 100,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let page = query
        .query(request.clone())
        .await
        .expect("a bounded call, not an error")
        .into_inner();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the call ends near search.max_scan_time, not at the read statement timeout: {took:?}"
    );
    let messages = messages(&page.events);
    assert_eq!(messages.len(), 20, "the recent matches: {messages:?}");
    assert!(messages.iter().all(|message| message.starts_with("recent")));
    assert!(!page.next_page_token.is_empty(), "a token to go on with");
    assert!(page.scanned_until.is_some());
    let cancelled = common::metric_sum(
        &server.metrics().await,
        "sluice_search_steps_cancelled_total",
        "",
    );
    assert!(
        cancelled >= 1.0,
        "the cancelled step is counted: {cancelled}"
    );
    // Once the lock is gone, paging on from the token finds the rest, and nothing twice.
    sqlx::query("COMMIT")
        .execute(&mut locker)
        .await
        .expect("commit");
    let (rest, _, _) = page_through(
        &mut query,
        QueryRequest {
            page_token: page.next_page_token,
            ..request.clone()
        },
    )
    .await;
    assert_eq!(rest.len(), 20, "the old matches, once each");
    let first: HashSet<&String> = page.events.iter().map(|event| &event.id).collect();
    assert!(rest.iter().all(|id| !first.contains(id)));

    // The first step of a call is bounded too: with the newest partition held, a fresh call
    // answers on time with nothing and a token, and paging on from it later finds everything.
    common::lock_partition_of(&mut locker, "recent needle 0").await;
    let started = std::time::Instant::now();
    let blocked = query
        .query(request.clone())
        .await
        .expect("a bounded call, not an error")
        .into_inner();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(blocked.events.is_empty());
    assert!(!blocked.next_page_token.is_empty(), "a token to go on with");
    sqlx::query("COMMIT")
        .execute(&mut locker)
        .await
        .expect("commit");
    let (all, _, _) = page_through(
        &mut query,
        QueryRequest {
            page_token: blocked.next_page_token,
            ..request
        },
    )
    .await;
    assert_eq!(all.len(), 40, "every match, once each");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_the_read_statement_timeout_is_deadline_exceeded_while_export_streams_on() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_DATABASE__READ_STATEMENT_TIMEOUT", "500ms"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    publish(&mut ingest, vec![event("scan", "message number 12345")]).await;
    let mut query = server.query_client().await;
    // A statement that waits on a lock runs for as long as the lock is held, whatever the
    // machine's speed: the Query is cancelled at the read statement timeout.
    let mut locker = database.connect().await;
    common::lock_partition_of(&mut locker, "message number 12345").await;
    let refused = query
        .query(QueryRequest {
            services: vec!["scan".to_owned()],
            ..Default::default()
        })
        .await
        .expect_err("the statement waits on the lock past the read statement timeout");
    assert_eq!(refused.code(), tonic::Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains("read_statement_timeout"));
    // Export streams for as long as its client reads: exempt. It waits on the same lock for
    // twice the timeout, then answers.
    let mut export = server.query_client().await;
    let exported = tokio::spawn(async move {
        export_all(
            &mut export,
            ExportRequest {
                message_contains: "number 12345".to_owned(),
                ..Default::default()
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!exported.is_finished(), "the export waits on the lock");
    TestDatabase::resume_writers(locker).await;
    let (total, lines) = exported.await.expect("export");
    assert_eq!((total, lines.len()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_has_a_request_id_echoed_in_its_response_and_logged_with_its_lines() {
    let (_database, server, mut ingest, mut query) = start().await;
    let mut publish = tonic::Request::new(common::request(vec![common::event("traced", "one")]));
    publish
        .metadata_mut()
        .insert("x-request-id", "req-77".parse().expect("ascii"));
    let response = ingest.publish(publish).await.expect("publish");
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .and_then(|id| id.to_str().ok()),
        Some("req-77")
    );
    // Without one, the server makes one.
    let response = query
        .stats(sluice::proto::StatsRequest::default())
        .await
        .expect("stats");
    let made = response
        .metadata()
        .get("x-request-id")
        .and_then(|id| id.to_str().ok())
        .expect("a request id");
    assert!(uuid::Uuid::try_parse(made).is_ok(), "{made}");
    // The log lines of a call carry its request id and principal.
    let mut delete = tonic::Request::new(DeleteRequest {
        services: vec!["traced".to_owned()],
        ..Default::default()
    });
    delete
        .metadata_mut()
        .insert("x-request-id", "req-78".parse().expect("ascii"));
    query.delete(delete).await.expect("delete");
    let line = server.log_line("delete request served").await;
    assert!(line.contains(r#""request_id":"req-78""#), "{line}");
    assert!(line.contains(r#""principal":"#), "{line}");
}

/// The valid `events_search_*` indexes on `events`.
async fn search_indexes(database: &TestDatabase) -> Vec<String> {
    let mut connection = database.connect().await;
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = 'events'::regclass AND c.relname::text LIKE 'events\\_search\\_%' \
         AND i.indisvalid ORDER BY 1",
    )
    .fetch_all(&mut connection)
    .await
    .expect("indexes")
}

/// The plan of `sql` with sequential scans discouraged: which index can serve it.
async fn plan(database: &TestDatabase, sql: &str) -> String {
    let mut connection = database.connect().await;
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut connection)
        .await
        .expect("set");
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .fetch_all(&mut connection)
        .await
        .expect("explain");
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_indexes_are_built_at_start_serve_the_content_filters_and_go_when_turned_off() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("sluice.toml"),
        "[retention]\ndefault = \"90days\"\n[search]\nmessage_index = true\n\
         metadata_index = true\nindexed_metadata_keys = [\"region\"]\n",
    )
    .expect("sluice.toml");
    let spec = ServerSpec {
        dir: Some(dir.path().to_owned()),
        ..ServerSpec::with_database(&database.url)
    };
    let server = TestServer::start(spec.clone()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while search_indexes(&database).await.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "indexes not built:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    let mut all = fixture();
    for message in ["progress 100%_done", "progress 100x done", "progress 10%_d"] {
        all.push(event("checkout", message));
    }
    publish(&mut ingest, all.clone()).await;
    let expect = |predicate: &dyn Fn(&Event) -> bool| -> Vec<String> {
        let chosen: Vec<Event> = all
            .iter()
            .filter(|event| predicate(event))
            .cloned()
            .collect();
        messages(&chosen)
    };
    for (needle, wanted) in [
        (
            "timeout",
            expect(&|event| event.message.contains("timeout")),
        ),
        // LIKE's wildcards in the needle are literal characters.
        (
            "0%_d",
            vec!["progress 10%_d".to_owned(), "progress 100%_done".to_owned()],
        ),
        ("00%_", vec!["progress 100%_done".to_owned()]),
        // Under 3 characters the trigram index has nothing to look up: strpos alone.
        (
            "%_",
            vec!["progress 10%_d".to_owned(), "progress 100%_done".to_owned()],
        ),
    ] {
        let found = query_all(
            &mut query,
            QueryRequest {
                message_contains: needle.to_owned(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(messages(&found), wanted, "message_contains {needle:?}");
    }
    // The fixture's even events are in region eu.
    let in_eu: Vec<Event> = fixture().into_iter().step_by(2).collect();
    let eu = query_all(
        &mut query,
        QueryRequest {
            metadata_contains: Some(metadata(&[("region", text("eu"))])),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(messages(&eu), messages(&in_eu));
    let nested_500 = query_all(
        &mut query,
        QueryRequest {
            metadata_contains: Some(metadata(&[(
                "http",
                nested(object(&[("status", text("500"))])),
            )])),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(nested_500.len(), 12, "every fifth of the 60");

    // The conditions Query adds are the indexes' own expressions.
    let trigram = plan(
        &database,
        "SELECT id FROM events WHERE message LIKE '%timeout%'",
    )
    .await;
    assert!(trigram.contains("search_message_trgm"), "{trigram}");
    let key = plan(
        &database,
        "SELECT id FROM events WHERE (metadata ->> 'region') = 'eu'",
    )
    .await;
    assert!(key.contains("search_key_region"), "{key}");
    let containment = plan(
        &database,
        "SELECT id FROM events WHERE metadata @> '{\"http\": {\"status\": \"500\"}}'",
    )
    .await;
    assert!(containment.contains("search_metadata_gin"), "{containment}");

    // Turned off: the next start drops them.
    drop(server);
    std::fs::write(
        dir.path().join("sluice.toml"),
        "[retention]\ndefault = \"90days\"\n",
    )
    .expect("sluice.toml");
    let server = TestServer::start(spec).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !search_indexes(&database).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "indexes not dropped:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stats until `done` holds (figures reach PostgreSQL every `metrics.figures_interval`).
async fn stats_once(
    query: &mut QueryServiceClient<Channel>,
    request: StatsRequest,
    done: impl Fn(&sluice::proto::StatsResponse) -> bool,
) -> sluice::proto::StatsResponse {
    for _ in 0..200 {
        let stats = query.stats(request).await.expect("stats").into_inner();
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the figures never arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_carries_the_business_figures_of_every_node_over_a_chosen_window() {
    let database = TestDatabase::create().await;
    let spec = || {
        ServerSpec::with_database(&database.url).env("SLUICE_METRICS__FIGURES_INTERVAL", "100ms")
    };
    let first = TestServer::start(spec()).await;
    let second = TestServer::start(spec()).await;
    let sized = |service: &str, message_bytes: usize, metadata_bytes: usize| {
        let mut event = event(service, &"m".repeat(message_bytes));
        if metadata_bytes > 0 {
            let mut object = serde_json::Map::new();
            object.insert("blob".to_owned(), "x".repeat(metadata_bytes).into());
            event.metadata = Some(object.into());
        }
        event
    };
    // 30 small, 5 between 1 and 10 KiB, 2 over 10 KiB, and 3 refused, on the first node.
    let mut checkout: Vec<Event> = (0..30).map(|_| sized("checkout", 100, 0)).collect();
    checkout.extend((0..5).map(|_| sized("checkout", 2_000, 0)));
    checkout.extend((0..2).map(|_| sized("checkout", 100, 12_000)));
    checkout.push(Event {
        id: "not-a-uuid".to_owned(),
        ..event("checkout", "bad id")
    });
    checkout.push(Event {
        id: "still-not-a-uuid".to_owned(),
        ..event("checkout", "bad id")
    });
    checkout.push(Event {
        message: String::new(),
        ..event("checkout", "")
    });
    let mut ingest = first.ingest_client().await;
    let response = ingest
        .publish(common::request(checkout))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!((response.accepted, response.rejected), (37, 3));
    // 10 more, and one refused, on the second node.
    let mut billing: Vec<Event> = (0..10)
        .map(|n| event("billing", &format!("b{n}")))
        .collect();
    billing.push(Event {
        message: String::new(),
        ..event("billing", "")
    });
    let mut other = second.ingest_client().await;
    other
        .publish(common::request(billing))
        .await
        .expect("publish");

    let mut query = first.query_client().await;
    let stats = stats_once(&mut query, StatsRequest::default(), |stats| {
        stats
            .all_services
            .as_ref()
            .is_some_and(|all| (all.accepted, all.rejected) == (47, 4))
    })
    .await;
    let figures: BTreeMap<&str, &sluice::proto::ServiceFigures> = stats
        .figures
        .iter()
        .map(|figures| (figures.service.as_str(), figures))
        .collect();
    let checkout = figures["checkout"];
    assert_eq!((checkout.accepted, checkout.rejected), (37, 3));
    assert_eq!(
        checkout.rejected_by_reason,
        [
            ("invalid_id".to_owned(), 2),
            ("missing_message".to_owned(), 1)
        ]
        .into()
    );
    assert!((checkout.rejection_rate - 3.0 / 40.0).abs() < 1e-9);
    assert!((checkout.rejection_rate_by_reason["invalid_id"] - 2.0 / 40.0).abs() < 1e-9);
    assert_eq!(
        (
            checkout.size_under_1kib,
            checkout.size_1_to_10kib,
            checkout.size_over_10kib
        ),
        (30, 5, 2)
    );
    assert!(checkout.ack_latency_p50_ms > 0.0);
    assert!(checkout.ack_latency_p50_ms <= checkout.ack_latency_p95_ms);
    assert!(checkout.ack_latency_p95_ms <= checkout.ack_latency_p99_ms);
    assert!(checkout.processing_avg_ms > 0.0);
    assert!(checkout.processing_avg_ms <= checkout.processing_max_ms);
    let billing = figures["billing"];
    assert_eq!(
        (
            billing.accepted,
            billing.rejected,
            &billing.rejected_by_reason
        ),
        (10, 1, &[("missing_message".to_owned(), 1)].into())
    );
    // When events arrive: every accepted event in the hour and weekday it was received.
    let usage = stats.usage.expect("usage");
    assert_eq!(usage.by_hour_of_day.len(), 24);
    assert_eq!(usage.by_day_of_week.len(), 7);
    assert_eq!(usage.by_hour_of_day.iter().sum::<u64>(), 47);
    assert_eq!(usage.by_day_of_week.iter().sum::<u64>(), 47);
    let busiest = usage
        .by_hour_of_day
        .iter()
        .position(|count| *count > 0)
        .expect("an hour");
    let this_hour = Utc::now()
        .format("%H")
        .to_string()
        .parse::<usize>()
        .expect("hour");
    assert!(busiest == this_hour || (busiest + 1) % 24 == this_hour);

    // A window the caller chooses: yesterday holds nothing; a reversed one is refused.
    let yesterday = StatsRequest {
        start_time: at(TimeDelta::hours(48)),
        end_time: at(TimeDelta::hours(24)),
        ..Default::default()
    };
    let past = query.stats(yesterday).await.expect("stats").into_inner();
    assert!(past.figures.is_empty());
    assert_eq!(past.all_services.expect("all").accepted, 0);
    let reversed = StatsRequest {
        start_time: at(TimeDelta::hours(1)),
        end_time: at(TimeDelta::hours(2)),
        ..Default::default()
    };
    let status = query.stats(reversed).await.expect_err("reversed window");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_pages_cross_days_in_both_orders_exactly_like_one_sorted_list() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_RETENTION__DEFAULT", "90days")
            .env("SLUICE_READS__MAX_RESPONSE_BYTES", "65536"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    // `billing` has 20 short events over 40 hours; `bulky` 30 of 6 KiB over 3 days, so that
    // a page also ends at its byte bound, within a day and across one.
    let mut events = fixture();
    events.extend((0..30).map(|index: i64| Event {
        timestamp: at(TimeDelta::minutes(index * 150 + 7)),
        ..event("bulky", &format!("{index:02} {}", "x".repeat(6 * 1024)))
    }));
    publish(&mut ingest, events.clone()).await;
    let order = |oldest_first: bool| {
        let order = if oldest_first {
            Order::OldestFirst
        } else {
            Order::NewestFirst
        };
        order as i32
    };
    let stamp = |event: &Event| event.timestamp.as_ref().map(|at| (at.seconds, at.nanos));
    for service in ["billing", "bulky"] {
        for oldest_first in [false, true] {
            let mut expected: Vec<&Event> = events
                .iter()
                .filter(|event| event.service == service)
                .collect();
            expected.sort_by_key(|event| stamp(event));
            if !oldest_first {
                expected.reverse();
            }
            // With no range, and from an edge on every fifth hour of the span.
            for hours in std::iter::once(None).chain((1..80).step_by(5).map(Some)) {
                let edge = hours.and_then(|hours| at(TimeDelta::hours(hours)));
                let found = first_events(
                    &mut query,
                    QueryRequest {
                        services: vec![service.to_owned()],
                        start_time: if oldest_first { edge } else { None },
                        end_time: if oldest_first { None } else { edge },
                        order: order(oldest_first),
                        limit: 12,
                        ..Default::default()
                    },
                    1000,
                )
                .await;
                let edge = edge.map(|at| (at.seconds, at.nanos));
                let within: Vec<&String> = expected
                    .iter()
                    .filter(|event| match edge {
                        None => true,
                        Some(_) if oldest_first => stamp(event) >= edge,
                        Some(_) => stamp(event) < edge,
                    })
                    .map(|event| &event.id)
                    .collect();
                assert_eq!(
                    found.iter().map(|event| &event.id).collect::<Vec<_>>(),
                    within,
                    "{service}, {hours:?} h, oldest first: {oldest_first}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_page_returns_each_events_metadata_as_it_was_sent() {
    let (_database, _server, mut ingest, mut query) = start().await;
    let long = "ü".repeat(300);
    let sent = [
        serde_json::json!({}),
        serde_json::json!({"userId": "u-7", "n": 42, "f": -2.5, "tiny": 1e-300, "huge": 1e300,
            "t": true, "no": false, "nothing": null}),
        serde_json::json!({"escapes": "q\"b\\s/n\nt\tc\u{1}é😀", "k\u{e9}y": "v", "": "empty key"}),
        serde_json::json!({"deep": {"list": [1, "two", null, {"k": []}, [[]]], "o": {}},
            "long": long, "lists": [long, [long, {"long": long}]]}),
    ];
    let events: Vec<Event> = sent
        .iter()
        .enumerate()
        .map(|(index, metadata)| Event {
            metadata: match metadata {
                serde_json::Value::Object(object) => Some(object.clone().into()),
                _ => None,
            },
            ..event("shapes", &format!("event {index}"))
        })
        .collect();
    publish(&mut ingest, events).await;
    let request = QueryRequest {
        services: vec!["shapes".to_owned()],
        order: Order::OldestFirst as i32,
        ..Default::default()
    };
    let found = query_all(&mut query, request).await;
    assert_eq!(found.len(), sent.len());
    for event in found {
        let index: usize = event.message["event ".len()..].parse().expect("numbered");
        let metadata = event.metadata.expect("metadata");
        assert_eq!(
            serde_json::Value::Object(metadata.as_object().clone()),
            sent[index],
            "{}",
            event.message
        );
    }
}
