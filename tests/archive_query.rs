//! Query over both tiers against the real server, PostgreSQL and a real store: once the
//! lifecycle job has moved old days into archived objects, paging with one token reads the
//! rows and the archive as one table, in both orders and with every filter, while the job
//! moves days between the tiers; an archived object that is missing or corrupt is named in
//! DATA_LOSS, and a store that cannot be reached is UNAVAILABLE with RetryInfo.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{
    S3, ServerSpec, TestServer,
    archived::{Archived, Store, days_ago, event_at, export, fixture, line_id, number_n},
    metric_sum, publish,
};
use object_store::{ObjectStoreExt, PutPayload, path::Path};
use sluice::proto::{
    AuditRequest, DeleteRequest, Event, ExportRequest, Order, QueryRequest, StatsRequest,
    query_service_client::QueryServiceClient,
};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

/// Every page of `request` followed to the end: the events in page order, how many of them
/// the pages said came from the archive, and the calls it took. Checks that the pages keep
/// their order and never repeat an event.
async fn page_through(
    query: &mut QueryServiceClient<Channel>,
    request: QueryRequest,
) -> Result<(Vec<Event>, u32, usize), tonic::Status> {
    let oldest_first = request.order == Order::OldestFirst as i32;
    let mut events: Vec<Event> = Vec::new();
    let mut archived = 0;
    let mut calls = 0;
    let mut page_token = String::new();
    loop {
        calls += 1;
        assert!(calls < 2_000, "paging does not end");
        // ABORTED says the archive moved under the call again and again: retry it, as the
        // status asks (and as `sluice query` does).
        let mut aborted = 0;
        let page = loop {
            match query
                .query(QueryRequest {
                    page_token: page_token.clone(),
                    ..request.clone()
                })
                .await
            {
                Err(status) if status.code() == tonic::Code::Aborted && aborted < 20 => {
                    aborted += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                answer => break answer?.into_inner(),
            }
        };
        archived += page.archived_events;
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let key = |event: &Event| {
        let ts = event.timestamp.expect("timestamp");
        ((ts.seconds, ts.nanos), event.id.clone())
    };
    for pair in events.windows(2) {
        let (a, b) = (key(&pair[0]), key(&pair[1]));
        let ordered = if oldest_first { a < b } else { a > b };
        assert!(ordered, "pages out of order or repeated: {a:?} then {b:?}");
    }
    Ok((events, archived, calls))
}

fn ids(events: &[Event]) -> BTreeSet<String> {
    events.iter().map(|event| event.id.clone()).collect()
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    })
}

const PRIVATE: &str = "[privacy]\npseudonymize_user_id = true\nencrypt_metadata_keys = [\"ssn\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_reads_the_rows_and_the_archive_as_one_table_in_both_orders() {
    let archived = Archived::start(Store::Files, PRIVATE).await;
    let mut ingest = archived.server.ingest_client().await;
    let mut events = fixture();
    for event in &mut events {
        let mut metadata = event.metadata.take().expect("metadata").into_object();
        metadata.insert("ssn".to_owned(), format!("ssn-{}", event.id).into());
        event.metadata = Some(metadata.into());
    }
    let response = publish(&mut ingest, events.clone()).await;
    assert_eq!(response.accepted as usize, events.len(), "{response:?}");
    let report = archived.lifecycle();
    assert_eq!(report["rows_archived"], 90, "{report}");
    let mut query = archived.query_client().await;

    // Export reads both tiers from one snapshot: the answer each query must page to.
    let shapes: Vec<(&str, QueryRequest, ExportRequest)> = vec![
        (
            "everything",
            QueryRequest::default(),
            ExportRequest::default(),
        ),
        (
            "one service",
            QueryRequest {
                services: vec!["orders".to_owned()],
                ..Default::default()
            },
            ExportRequest {
                services: vec!["orders".to_owned()],
                ..Default::default()
            },
        ),
        (
            "one user, pseudonymized at rest",
            QueryRequest {
                user_id: "alice".to_owned(),
                ..Default::default()
            },
            ExportRequest {
                user_id: "alice".to_owned(),
                ..Default::default()
            },
        ),
        (
            "message and metadata",
            QueryRequest {
                message_contains: "event 3".to_owned(),
                metadata_contains: Some(number_n(3.0)),
                ..Default::default()
            },
            ExportRequest {
                message_contains: "event 3".to_owned(),
                metadata_contains: Some(number_n(3.0)),
                ..Default::default()
            },
        ),
        (
            "a range across the boundary",
            QueryRequest {
                start_time: timestamp(days_ago(11, 0)),
                end_time: timestamp(days_ago(1, 5)),
                ..Default::default()
            },
            ExportRequest {
                start_time: timestamp(days_ago(11, 0)),
                end_time: timestamp(days_ago(1, 5)),
                ..Default::default()
            },
        ),
    ];
    for (shape, request, export_request) in shapes {
        let (total, from_archive, lines) = export(&mut query, export_request).await;
        let expected: BTreeSet<String> = lines.iter().map(|line| line_id(line)).collect();
        assert!(
            from_archive > 0 && total > from_archive,
            "{shape}: both tiers hold some"
        );
        for order in [Order::NewestFirst, Order::OldestFirst] {
            for limit in [7, 1000] {
                let (found, archived_count, calls) = page_through(
                    &mut query,
                    QueryRequest {
                        order: order as i32,
                        limit,
                        ..request.clone()
                    },
                )
                .await
                .expect("query");
                assert_eq!(ids(&found), expected, "{shape}, {order:?}, limit {limit}");
                assert_eq!(
                    u64::from(archived_count),
                    from_archive,
                    "{shape}, {order:?}: pages say which events are archived"
                );
                assert!(calls >= found.len() / limit as usize, "{shape}");
            }
        }
    }

    // Privacy as on rows: the plain user id finds the pseudonymized archived events, and an
    // encrypted value opens for scope `pii` (the zero-config client has it).
    let (alice, _, _) = page_through(
        &mut query,
        QueryRequest {
            user_id: "alice".to_owned(),
            order: Order::OldestFirst as i32,
            ..Default::default()
        },
    )
    .await
    .expect("query");
    let oldest = &alice[0];
    assert_eq!(oldest.service, "payments", "the oldest is archived");
    let metadata = oldest.metadata.clone().expect("metadata").into_object();
    assert_eq!(metadata["ssn"], format!("ssn-{}", oldest.id));
    assert!(oldest.ingested_at.is_some());

    // Stats says how much of each total is archived.
    let stats = query
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((stats.total_events, stats.archived_events), (100, 90));
    let by_service: BTreeMap<&str, (u64, u64)> = stats
        .services
        .iter()
        .map(|count| (count.service.as_str(), (count.total, count.archived)))
        .collect();
    assert_eq!(by_service["orders"], (80, 70));
    assert_eq!(by_service["payments"], (20, 20));
    // The objects were read once each, then from the cache.
    let metrics = archived.server.metrics().await;
    let from_store = metric_sum(
        &metrics,
        "sluice_archive_query_objects_total",
        "source=\"store\"",
    );
    assert!((1.0..=3.0).contains(&from_store), "{from_store}");

    // Reads of archived personal data are audited like reads of rows, saying how many
    // archived events each call returned.
    let audit = query
        .audit(AuditRequest {
            rpc: "Query".to_owned(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner();
    let archived_rows: f64 = audit
        .entries
        .iter()
        .filter_map(|entry| {
            let details = entry.details.clone()?.into_object();
            details.get("archived_rows")?.as_f64()
        })
        .sum();
    assert!(archived_rows >= 90.0, "{archived_rows}");

    // A Delete reaches both tiers, and Stats' archived share follows it.
    query
        .delete(DeleteRequest {
            user_id: "alice".to_owned(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let stats = query
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((stats.total_events, stats.archived_events), (50, 45));
    let (left, _, _) = page_through(&mut query, QueryRequest::default())
        .await
        .expect("query");
    assert_eq!(left.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_while_the_lifecycle_moves_days_misses_and_repeats_nothing() {
    let archived = Archived::start(Store::Files, "").await;
    let mut ingest = archived.server.ingest_client().await;
    let mut all = BTreeSet::new();
    for days in 8..14 {
        let mut events = Vec::new();
        for service in ["alpha", "beta", "gamma", "delta"] {
            for n in 0..150 {
                events.push(event_at(service, "u", days_ago(days, n as i64 * 7), n));
            }
        }
        all.extend(ids(&events));
        let response = publish(&mut ingest, events).await;
        assert_eq!(response.accepted, 600, "{response:?}");
    }
    let recent: Vec<Event> = (0..200)
        .map(|n| event_at("alpha", "u", days_ago(1, n), n as usize))
        .collect();
    all.extend(ids(&recent));
    publish(&mut ingest, recent).await;

    // The job runs in its own process while both orders are paged, again and again: every
    // pass, before, during and after the move, must find every event once.
    let mut job =
        common::lifecycle_command(&archived.server, &archived.database.url, &archived.env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start sluice lifecycle");
    let mut query = archived.query_client().await;
    let mut passes = 0;
    loop {
        let running = job.try_wait().expect("lifecycle state").is_none();
        for order in [Order::NewestFirst, Order::OldestFirst] {
            let request = QueryRequest {
                order: order as i32,
                limit: 60,
                ..Default::default()
            };
            let (found, _, _) = page_through(&mut query, request).await.expect("query");
            assert_eq!(found.len(), all.len(), "pass {passes}, {order:?}");
            assert_eq!(ids(&found), all, "pass {passes}, {order:?}");
        }
        passes += 1;
        if !running {
            break;
        }
    }
    let output = job.wait_with_output().expect("lifecycle output");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lifecycle: serde_json::Value = serde_json::from_slice(&output.stdout).expect("report");
    eprintln!("{passes} passes of both orders while and after the job ran");
    assert_eq!(lifecycle["rows_archived"], 3_600, "{lifecycle}");
    assert_eq!(archived.hot_rows("TRUE").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_corrupt_object_is_data_loss_by_name_and_an_unreachable_store_unavailable() {
    let prefix = format!("query-faults-{}", uuid::Uuid::new_v4().simple());
    let archived = Archived::start(Store::S3 { prefix }, "").await;
    let mut ingest = archived.server.ingest_client().await;
    publish(&mut ingest, fixture()).await;
    archived.lifecycle();
    let catalog = archived.catalog().await;
    let path_of = |service: &str| {
        catalog
            .iter()
            .map(|(path, _, _)| path.clone())
            .find(|path| path.starts_with(&format!("service={service}/")))
            .expect("an object")
    };
    let mut query = archived.query_client().await;

    // Another node whose store cannot be reached (nothing listens on its endpoint) answers
    // UNAVAILABLE with RetryInfo, which stock gRPC retry policies act on.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let s3 = S3::from_env();
    let mut spec = ServerSpec::with_database(&archived.database.url).toml(&format!(
        "[lifecycle]\nenabled = false\n\n[archive]\nafter = \"off\"\nurl = \"s3://{}/unreachable\"\n",
        s3.bucket
    ));
    for (key, value) in s3.env() {
        let value = if key == "AWS_ENDPOINT_URL" {
            dead.clone()
        } else {
            value
        };
        spec = spec.env(&key, &value);
    }
    let cut_off = TestServer::start(spec).await;
    let mut cut_off_query = cut_off.query_client().await;
    let status = page_through(&mut cut_off_query, QueryRequest::default())
        .await
        .expect_err("the store cannot be reached");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.get_details_retry_info().is_some(), "{status:?}");
    // Rows alone are still served: a service with no archived object.
    publish(&mut ingest, vec![common::event("fresh", "hot only")]).await;
    let hot_only = QueryRequest {
        services: vec!["fresh".to_owned()],
        ..Default::default()
    };
    let (fresh, _, _) = page_through(&mut cut_off_query, hot_only)
        .await
        .expect("rows");
    assert_eq!(fresh.len(), 1);

    // A corrupt object: its sha256 differs from the catalog's.
    let orders = path_of("orders");
    archived
        .objects
        .put(
            &Path::from(orders.as_str()),
            PutPayload::from_static(b"not what was written"),
        )
        .await
        .expect("overwrite");
    let orders_only = QueryRequest {
        services: vec!["orders".to_owned()],
        ..Default::default()
    };
    let status = page_through(&mut query, orders_only)
        .await
        .expect_err("corrupt");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains(&orders), "{}", status.message());

    // A missing object.
    let payments = path_of("payments");
    archived
        .objects
        .delete(&Path::from(payments.as_str()))
        .await
        .expect("delete");
    let status = page_through(
        &mut query,
        QueryRequest {
            services: vec!["payments".to_owned()],
            ..Default::default()
        },
    )
    .await
    .expect_err("missing");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains(&payments) && status.message().contains("missing"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_query_reads_only_the_archived_objects_that_may_hold_the_trace() {
    let archived = Archived::start(Store::Files, "").await;
    let mut ingest = archived.server.ingest_client().await;
    publish(&mut ingest, fixture()).await;
    // Four more orders ten days ago, brought by one traced request.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced: Vec<Event> = (100..104)
        .map(|n| event_at("orders", "carol", days_ago(10, n as i64), n))
        .collect();
    let mut request = tonic::Request::new(common::request(traced.clone()));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("traceparent"),
    );
    let response = ingest.publish(request).await.expect("publish").into_inner();
    assert_eq!(response.accepted, 4);
    archived.lifecycle();
    assert_eq!(
        archived.catalog().await.len(),
        3,
        "three objects, one with the trace"
    );

    let mut query = archived.query_client().await;
    let (found, from_archive, _) = page_through(
        &mut query,
        QueryRequest {
            trace_id: trace_id.to_owned(),
            ..Default::default()
        },
    )
    .await
    .expect("query");
    assert_eq!(ids(&found), ids(&traced));
    assert_eq!(from_archive, 4);
    assert!(found.iter().all(|event| event.trace_id == trace_id));
    // The two objects whose trace filter rules the trace out were never fetched.
    let metrics = archived.server.metrics().await;
    let fetched = metric_sum(
        &metrics,
        "sluice_archive_query_objects_total",
        "source=\"store\"",
    );
    assert_eq!(fetched, 1.0);
}
