//! Ingest over mTLS into real PostgreSQL: volume, partial success, backpressure, idempotency,
//! bad-row isolation and per-request acks.

mod common;

use std::time::Duration;

use common::{ServerSpec, TestDatabase, TestServer, event, metric_sum};
use sluice::proto::{Event, IngestRequest};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_of_100k_events_over_concurrent_streams_stores_every_one() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // Room for every event at once: the streams never wait on the writers, whatever the
    // machine's speed (backpressure has tests of its own).
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_BUFFER__MAX_EVENTS", "200000"),
    )
    .await;
    const STREAMS: usize = 8;
    const PER_STREAM: usize = 12_500;
    const BATCH: usize = 500;
    let mut tasks = tokio::task::JoinSet::new();
    for stream_index in 0..STREAMS {
        let mut client = server.ingest_client().await;
        tasks.spawn(async move {
            let requests = (0..PER_STREAM / BATCH).map(move |batch_index| IngestRequest {
                events: (0..BATCH)
                    .map(|offset| {
                        event(
                            "volume",
                            &format!(
                                "stream {stream_index} event {}",
                                batch_index * BATCH + offset
                            ),
                        )
                    })
                    .collect(),
                sequence: 0,
            });
            client
                .ingest(tokio_stream::iter(requests))
                .await
                .expect("ingest ok")
                .into_inner()
        });
    }
    let mut accepted = 0;
    while let Some(response) = tasks.join_next().await {
        let response = response.expect("task");
        assert_eq!(response.rejected, 0);
        accepted += response.accepted;
    }
    assert_eq!(accepted, (STREAMS * PER_STREAM) as u64);
    assert_eq!(
        database.scalar("SELECT count(*) FROM events").await,
        (STREAMS * PER_STREAM) as i64
    );
    assert_eq!(
        database
            .scalar("SELECT count(DISTINCT message) FROM events")
            .await,
        (STREAMS * PER_STREAM) as i64
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "sluice_events_stored_total", ""),
        (STREAMS * PER_STREAM) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_rejected_individually_while_valid_neighbours_are_stored() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut client = server.ingest_client().await;
    let old = chrono::Utc::now() - chrono::Duration::days(40);
    let events = vec![
        event("orders", "valid 0"),
        Event {
            service: "Bad Service".to_owned(),
            ..event("x", "invalid service")
        },
        event("orders", "valid 2"),
        Event {
            message: String::new(),
            ..event("orders", "")
        },
        Event {
            timestamp: Some(prost_types::Timestamp {
                seconds: old.timestamp(),
                nanos: 0,
            }),
            ..event("orders", "too old")
        },
        Event {
            id: "not-a-uuid".to_owned(),
            ..event("orders", "bad id")
        },
        Event {
            timestamp: None,
            ..event("orders", "no time")
        },
        event("orders", "valid 7"),
    ];
    let response = common::publish(&mut client, events).await;
    assert_eq!((response.accepted, response.rejected), (3, 5));
    let fields: Vec<(u64, &str)> = response
        .rejections
        .iter()
        .map(|rejection| (rejection.index, rejection.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            (1, "service"),
            (3, "message"),
            (4, "timestamp"),
            (5, "id"),
            (6, "timestamp")
        ]
    );
    assert!(
        response
            .rejections
            .iter()
            .all(|rejection| !rejection.reason.is_empty())
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE message LIKE 'valid %'")
            .await,
        3
    );
    assert_eq!(database.scalar("SELECT count(*) FROM events").await, 3);
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "sluice_events_rejected_total", "invalid_service"),
        1.0
    );
    assert_eq!(
        metric_sum(&metrics, "sluice_events_rejected_total", ""),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stream_reports_rejections_with_stream_wide_indexes() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut client = server.ingest_client().await;
    let requests = vec![
        IngestRequest {
            events: vec![event("a", "1"), event("a", "2")],
            sequence: 0,
        },
        IngestRequest {
            events: vec![
                event("a", "3"),
                Event {
                    service: String::new(),
                    ..event("a", "4")
                },
            ],
            sequence: 0,
        },
    ];
    let response = client
        .ingest(tokio_stream::iter(requests))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!((response.accepted, response.rejected), (3, 1));
    assert_eq!(response.rejections[0].index, 3);
    assert_eq!(response.rejections[0].field, "service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_refuses_with_retry_info_and_exactly_the_accepted_events_are_stored() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_BUFFER__MAX_EVENTS", "1000")
            .env("SLUICE_BUFFER__ADMIT_WAIT", "0s"),
    )
    .await;
    // Stall the writers: COPY waits for this lock until the transaction ends.
    let blocker = database.stall_writers().await;

    let mut client = server.ingest_client().await;
    let (requests, request_stream) = tokio::sync::mpsc::channel(4);
    let call = tokio::spawn(async move {
        client
            .ingest(tokio_stream::wrappers::ReceiverStream::new(request_stream))
            .await
    });
    // Keep sending until the server refuses (the call ends and the request stream closes).
    let sender = tokio::spawn(async move {
        for batch in 0..40 {
            let events = (0..100)
                .map(|offset| event("flood", &format!("{}", batch * 100 + offset)))
                .collect();
            if requests.send(common::request(events)).await.is_err() {
                break;
            }
        }
    });
    // While the buffer is full, health says NOT_SERVING for ingest.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let ingest_health = tonic_health::pb::HealthCheckRequest {
        service: "sluice.v1.IngestService".to_owned(),
    };
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health
        .check(ingest_health.clone())
        .await
        .expect("health")
        .into_inner()
        .status
        != not_serving
    {
        assert!(
            std::time::Instant::now() < deadline,
            "health stayed SERVING with a full buffer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Release the writers so the events admitted before the refusal commit.
    TestDatabase::resume_writers(blocker).await;

    let status = call.await.expect("task").expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let details = status.get_error_details();
    let retry_delay = details
        .retry_info()
        .and_then(|retry| retry.retry_delay)
        .expect("RetryInfo present");
    assert!(retry_delay >= Duration::from_millis(100) && retry_delay <= Duration::from_secs(10));
    assert_eq!(
        details.error_info().expect("ErrorInfo").reason,
        "BUFFER_FULL"
    );
    let accepted: i64 = status
        .metadata()
        .get("sluice-accepted")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse().ok())
        .expect("sluice-accepted trailer");
    assert!(accepted > 0 && accepted <= 1000, "accepted {accepted}");
    assert_eq!(
        database.scalar("SELECT count(*) FROM events").await,
        accepted
    );
    // Exactly the first `accepted` events of the stream, so the client can resend the rest.
    assert_eq!(
        database
            .scalar("SELECT max(message::bigint) FROM events")
            .await,
        accepted - 1
    );
    let metrics = server.metrics().await;
    assert!(metric_sum(&metrics, "sluice_events_refused_total", "buffer_full") >= 100.0);
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_the_same_events_stores_each_exactly_once() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let events: Vec<Event> = (0..10_000)
        .map(|index| event("retry", &format!("event {index}")))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let mut client = server.ingest_client().await;
        let requests: Vec<IngestRequest> = events
            .chunks(500)
            .map(|chunk| common::request(chunk.to_vec()))
            .collect();
        tasks.spawn(async move {
            client
                .ingest(tokio_stream::iter(requests))
                .await
                .expect("ingest")
                .into_inner()
        });
    }
    while let Some(response) = tasks.join_next().await {
        let response = response.expect("task");
        assert_eq!((response.accepted, response.rejected), (10_000, 0));
    }
    assert_eq!(database.scalar("SELECT count(*) FROM events").await, 10_000);
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "sluice_events_duplicate_total", ""),
        20_000.0
    );
    assert_eq!(
        metric_sum(&metrics, "sluice_events_duplicate_conflicting_total", ""),
        0.0,
        "identical resends do not conflict"
    );

    // The same id and timestamp with other content: accepted (the key is the idempotency
    // key), the first version kept, and counted apart so that reused ids show.
    let mut client = server.ingest_client().await;
    let reused: Vec<Event> = events[..5]
        .iter()
        .map(|event| Event {
            message: "another event under a reused id".to_owned(),
            ..event.clone()
        })
        .collect();
    let response = common::publish(&mut client, reused).await;
    assert_eq!((response.accepted, response.rejected), (5, 0));
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE message LIKE 'another event%'")
            .await,
        0
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "sluice_events_duplicate_conflicting_total", ""),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_postgres_refuses_go_to_dead_letters_and_their_batch_neighbours_commit() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut client = server.ingest_client().await;
    let mut events: Vec<Event> = (0..200)
        .map(|index| event("poison", &format!("good {index}")))
        .collect();
    events[17].message = "nul \0 inside".to_owned();
    events[150].user_id = "user\0nul".to_owned();
    let poison_ids = [events[17].id.clone(), events[150].id.clone()];
    let response = common::publish(&mut client, events).await;
    assert_eq!((response.accepted, response.rejected), (198, 2));
    let rejected: Vec<(u64, &str)> = response
        .rejections
        .iter()
        .map(|rejection| (rejection.index, rejection.event_id.as_str()))
        .collect();
    assert_eq!(
        rejected,
        [(17, poison_ids[0].as_str()), (150, poison_ids[1].as_str())]
    );
    assert!(response.rejections[0].reason.contains("SQLSTATE"));
    // The database's own words stay in dead_letters and the log.
    assert!(
        !response.rejections[0].reason.contains("byte sequence"),
        "{:?}",
        response.rejections[0]
    );
    assert_eq!(database.scalar("SELECT count(*) FROM events").await, 198);
    assert_eq!(
        database.scalar("SELECT count(*) FROM dead_letters").await,
        2
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM dead_letters WHERE user_id = 'usernul'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stream_acks_every_sequence_once_durable_and_refuses_only_the_sequence_that_overflows()
 {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            // A sender alone may hold 90% of the buffer (the rest is headroom for others):
            // 340 events, room for three sequences of 100.
            .env("SLUICE_BUFFER__MAX_EVENTS", "340")
            .env("SLUICE_BUFFER__ADMIT_WAIT", "0s"),
    )
    .await;
    let blocker = database.stall_writers().await;

    let mut client = server.ingest_client().await;
    let (requests, request_stream) = tokio::sync::mpsc::channel(16);
    let mut acks = client
        .ingest_stream(tokio_stream::wrappers::ReceiverStream::new(request_stream))
        .await
        .expect("stream")
        .into_inner();
    for sequence in 0..4u64 {
        let events = (0..100)
            .map(|offset| event("acks", &format!("{sequence}-{offset}")))
            .collect();
        requests
            .send(IngestRequest { events, sequence })
            .await
            .expect("send");
    }
    // Sequence 3 does not fit (306 events of room for one sender): refused in its ack, the
    // stream stays open.
    let refusal = tokio::time::timeout(Duration::from_secs(10), acks.next())
        .await
        .expect("ack")
        .expect("item")
        .expect("ok");
    assert_eq!(
        (refusal.sequence, refusal.code),
        (3, Code::ResourceExhausted as i32)
    );
    assert!(refusal.retry_after.is_some());
    TestDatabase::resume_writers(blocker).await;
    let mut durable = Vec::new();
    for _ in 0..3 {
        let ack = acks.next().await.expect("ack").expect("ok");
        assert_eq!((ack.code, ack.accepted), (0, 100));
        durable.push(ack.sequence);
    }
    durable.sort();
    assert_eq!(durable, [0, 1, 2]);
    // The refused sequence, resent, is accepted.
    let events = (0..100)
        .map(|offset| event("acks", &format!("3-{offset}")))
        .collect();
    requests
        .send(IngestRequest {
            events,
            sequence: 3,
        })
        .await
        .expect("send");
    let ack = acks.next().await.expect("ack").expect("ok");
    assert_eq!((ack.sequence, ack.code, ack.accepted), (3, 0, 100));
    drop(requests);
    assert!(
        acks.next().await.is_none(),
        "stream ends OK after half-close"
    );
    assert_eq!(database.scalar("SELECT count(*) FROM events").await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_event_limit_is_invalid_argument_with_bad_request() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_GRPC__MAX_EVENTS_PER_REQUEST", "10"),
    )
    .await;
    let mut client = server.ingest_client().await;
    let events = (0..11)
        .map(|index| event("big", &index.to_string()))
        .collect();
    let status = client
        .publish(common::request(events))
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument);
    let violations = status
        .get_error_details()
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .clone();
    assert_eq!(violations[0].field, "events");

    let huge = Event {
        message: "x".repeat(8000),
        ..event("big", "")
    };
    let requests = vec![common::request(vec![huge; 9])];
    let server_limited = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_GRPC__MAX_MESSAGE_BYTES", "65536"),
    )
    .await;
    let mut limited_client = server_limited.ingest_client().await;
    let status = limited_client
        .ingest(tokio_stream::iter(requests.clone()))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.get_error_details().bad_request().is_some());
    let accepted = status
        .metadata()
        .get("sluice-accepted")
        .and_then(|value| value.to_str().ok());
    assert_eq!(
        accepted,
        Some("0"),
        "progress trailers tell the client what to resend"
    );
    // A unary call is decoded before any handler runs; it gets the same answer.
    let status = limited_client
        .publish(requests[0].clone())
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.get_error_details().bad_request().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_zstd_compressed_requests_are_accepted() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    for encoding in [
        tonic::codec::CompressionEncoding::Gzip,
        tonic::codec::CompressionEncoding::Zstd,
    ] {
        let mut client = server
            .ingest_client()
            .await
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let events = (0..50)
            .map(|index| event("compressed", &format!("{encoding:?} {index}")))
            .collect();
        let response = common::publish(&mut client, events).await;
        assert_eq!(response.accepted, 50);
    }
    assert_eq!(database.scalar("SELECT count(*) FROM events").await, 100);
}
