//! Delivery guarantees under failure: a PostgreSQL outage (the spool keeps ingest
//! acknowledged), SIGKILL mid-ingest (acknowledged means durable; resends store exactly once),
//! and a spool with a torn tail left by a crash.

mod common;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use common::{
    ServerSpec, TestDatabase, TestServer, event, metric_sum,
    streaming::{ids_of, requests, stream_until},
    wait_for_status,
};
use sluice::{proto::IngestRequest, store::EmbeddedPostgres};
use tonic_health::pb::health_check_response::ServingStatus;
use uuid::Uuid;

async fn stored_ids(connection: &mut sqlx::PgConnection) -> (i64, HashSet<Uuid>) {
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM events")
        .fetch_all(&mut *connection)
        .await
        .expect("ids");
    (ids.len() as i64, ids.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_ingest_loses_no_acknowledged_event_and_resends_store_each_exactly_once() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let mut server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let all = requests(400, 500, "kill");
    let pid = server.pid();
    // Kill the server once a third of the requests are acknowledged, from inside the ack loop.
    let acked = stream_until(&server, &all, 8, Duration::ZERO, |acked| {
        if acked == 130 {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill");
        }
        true
    })
    .await;
    assert!(!server.wait(Duration::from_secs(10)).success(), "killed");
    assert!(
        acked.len() >= 130 && acked.len() < all.len(),
        "killed partway: {} acked",
        acked.len()
    );

    // Restart on the same directory (a spool, if any, is replayed) and check every ack.
    let spec = ServerSpec {
        dir: Some(server.dir_path().to_owned()),
        ..ServerSpec::with_database(&database.url)
    };
    let restarted = TestServer::start(spec).await;
    let mut connection = database.connect().await;
    let (rows, stored) = stored_ids(&mut connection).await;
    assert_eq!(rows as usize, stored.len(), "no event stored twice");
    let acked_ids = ids_of(acked.iter().map(|sequence| &all[*sequence as usize]));
    assert!(
        acked_ids.is_subset(&stored),
        "{} acknowledged events missing",
        acked_ids.difference(&stored).count()
    );

    // The client resends everything not acknowledged, with the same ids: each is stored once.
    let unacked: Vec<IngestRequest> = all
        .iter()
        .filter(|request| !acked.contains(&request.sequence))
        .cloned()
        .collect();
    let renumbered: Vec<IngestRequest> = unacked
        .into_iter()
        .enumerate()
        .map(|(index, request)| IngestRequest {
            sequence: index as u64,
            ..request
        })
        .collect();
    let resent = stream_until(&restarted, &renumbered, 8, Duration::ZERO, |_| true).await;
    assert_eq!(resent.len(), renumbered.len());
    let (rows, stored) = stored_ids(&mut connection).await;
    assert_eq!(rows, 200_000);
    assert_eq!(stored, ids_of(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_keeps_ingest_acknowledged_through_the_spool_and_loses_nothing() {
    common::init_crypto();
    let server =
        TestServer::start(ServerSpec::default().env("SLUICE_BREAKER__OPEN_INITIAL", "500ms")).await;
    let data_dir = server.dir_path().join("data");
    let cluster = EmbeddedPostgres::start(&data_dir).expect("attach to the private cluster");
    let url = cluster.url();

    let all = requests(5000, 10, "outage");
    let started = Instant::now();
    let outage = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.stop().expect("stop PostgreSQL");
        let stopped_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let cluster = EmbeddedPostgres::start(&data_dir).expect("restart PostgreSQL");
        (stopped_at, Instant::now(), cluster)
    });
    let mut ack_times = Vec::new();
    // Paced so that the stream spans the outage (5000 requests, at least 3 ms apart).
    let acked = stream_until(&server, &all, 4, Duration::from_millis(3), |_| {
        ack_times.push(Instant::now());
        true
    })
    .await;
    let (stopped_at, restarted_at, _cluster) = outage.await.expect("outage task");
    assert_eq!(
        acked.len(),
        all.len(),
        "every request acknowledged, outage or not"
    );
    let during_outage = ack_times
        .iter()
        .filter(|at| **at > stopped_at + Duration::from_secs(2) && **at < restarted_at)
        .count();
    assert!(
        during_outage > 50,
        "ingest kept being acknowledged during the outage ({during_outage} acks)"
    );
    assert!(restarted_at > started, "the outage happened during the run");

    // After recovery the replayer drains the spool: every acknowledged event, exactly once.
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (rows, stored) = stored_ids(&mut connection).await;
        if stored.len() == 50_000 {
            assert_eq!(rows, 50_000, "no event stored twice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spool not replayed: {} of 50000 stored\n{}",
            stored.len(),
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, stored) = stored_ids(&mut connection).await;
    assert_eq!(stored, ids_of(&all));
    let metrics = server.metrics().await;
    assert!(
        metric_sum(&metrics, "sluice_events_spooled_total", "") > 0.0,
        "the spool was used"
    );
    assert_eq!(
        metric_sum(&metrics, "sluice_events_replayed_total", ""),
        metric_sum(&metrics, "sluice_events_spooled_total", "")
    );
    assert!(server.logs().contains("circuit open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_with_a_torn_tail_is_replayed_at_startup_up_to_the_tear() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("data/spool");
    let validation = sluice::config::ValidationConfig::default();
    let validator = sluice::ingest::validate::Validator::new(&validation, chrono::Utc::now());
    let batches: Vec<Vec<sluice::event::ValidEvent>> = (0..3)
        .map(|batch| {
            (0..100)
                .map(|offset| {
                    validator
                        .validate(offset, event("spooled", &format!("{batch}-{offset}")))
                        .expect("valid")
                })
                .collect()
        })
        .collect();
    {
        let (spool, _) = sluice::spool::Spool::open(&spool_dir, 1 << 30, 1 << 26)
            .await
            .expect("spool");
        for batch in &batches {
            spool
                .append(&batch.iter().collect::<Vec<_>>(), Some(chrono::Utc::now()))
                .await
                .expect("append");
        }
    }
    // A crash mid-write: the last record is torn.
    let segment = std::fs::read_dir(&spool_dir)
        .expect("dir")
        .next()
        .expect("segment")
        .expect("entry")
        .path();
    let length = std::fs::metadata(&segment).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open")
        .set_len(length - 50)
        .expect("truncate");

    let spec = ServerSpec {
        dir: Some(dir.path().to_owned()),
        ..ServerSpec::with_database(&database.url)
    };
    let server = TestServer::start(spec).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while database.scalar("SELECT count(*) FROM events").await < 200 {
        assert!(
            Instant::now() < deadline,
            "spool not replayed:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        database.scalar("SELECT count(*) FROM events").await,
        200,
        "the two intact records, not the torn one"
    );
    assert!(server.logs().contains("torn tail"));
    let metrics = server.metrics().await;
    assert!(metric_sum(&metrics, "sluice_spool_truncated_bytes_total", "") > 0.0);
    // A replayed segment is removed once its records are committed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&spool_dir).expect("dir").next().is_some() {
        assert!(Instant::now() < deadline, "replayed segments are deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_and_the_spool_full_clients_get_resource_exhausted_and_lose_nothing()
{
    use tonic_types::StatusExt;
    common::init_crypto();
    let server = TestServer::start(
        ServerSpec::default()
            .env("SLUICE_SPOOL__MAX_BYTES", "20000")
            .env("SLUICE_BUFFER__MAX_EVENTS", "200")
            .env("SLUICE_BUFFER__ADMIT_WAIT", "0s"),
    )
    .await;
    let data_dir = server.dir_path().join("data");
    let cluster = EmbeddedPostgres::start(&data_dir).expect("attach to the private cluster");
    let url = cluster.url();
    cluster.stop().expect("stop PostgreSQL");

    // Publish 50-event requests until refused: first the spool (20 kB) takes batches, then the
    // buffer (200 events) fills behind it.
    let client = server.ingest_client().await;
    let mut acknowledged = HashSet::new();
    let mut refusal = None;
    let mut pending = tokio::task::JoinSet::new();
    // Refusals can come early too (the buffer fills while the circuit is still closed); keep
    // sending until one comes after the spool has taken batches, i.e. once the spool is full.
    for round in 0..300 {
        let events: Vec<_> = (0..50)
            .map(|offset| event("spoolfull", &format!("{round}-{offset}")))
            .collect();
        let ids: Vec<Uuid> = events
            .iter()
            .map(|event| Uuid::parse_str(&event.id).expect("uuid"))
            .collect();
        let mut sender = client.clone();
        pending.spawn(async move { (ids, sender.publish(common::request(events)).await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Some(done) = pending.try_join_next() {
            let (ids, result) = done.expect("task");
            match result {
                Ok(response) => {
                    assert_eq!(response.into_inner().accepted, 50);
                    acknowledged.extend(ids);
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    // The refusal that counts comes once the spool is full: it took batches
                    // (acks) and then refused one.
                    if !acknowledged.is_empty()
                        && metric_sum(
                            &server.metrics().await,
                            "sluice_writer_errors_total",
                            "kind=\"spool\"",
                        ) > 0.0
                    {
                        refusal = Some(status);
                    }
                }
            }
        }
        if refusal.is_some() {
            break;
        }
    }
    let refusal = refusal.expect("a full spool and buffer end in a refusal after acks");
    // The refusal tells the client when to come back, and why.
    let details = refusal.get_error_details();
    assert!(details.retry_info().is_some(), "RetryInfo present");
    assert_eq!(
        details.error_info().map(|info| info.reason.as_str()),
        Some("BUFFER_FULL")
    );
    // It came once the spool was full: the spool took batches, then refused them.
    let metrics = server.metrics().await;
    assert!(metric_sum(&metrics, "sluice_events_spooled_total", "") > 0.0);
    drop(client);

    // Database back: the buffered requests commit, the spool replays, every ack holds.
    let _cluster = EmbeddedPostgres::start(&data_dir).expect("restart PostgreSQL");
    while let Some(done) = pending.join_next().await {
        let (ids, result) = done.expect("task");
        if let Ok(response) = result {
            assert_eq!(response.into_inner().accepted, 50);
            acknowledged.extend(ids);
        }
    }
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (rows, stored) = stored_ids(&mut connection).await;
        if acknowledged.is_subset(&stored) {
            assert_eq!(rows as usize, stored.len(), "no event stored twice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged events missing\n{}",
            acknowledged.difference(&stored).count(),
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The replayer counts a segment once it is deleted, just after its last batch commits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = server.metrics().await;
        let spooled = metric_sum(&metrics, "sluice_events_spooled_total", "");
        let replayed = metric_sum(&metrics, "sluice_events_replayed_total", "");
        if replayed == spooled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{replayed} of {spooled} spooled events replayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_spool_segment_is_quarantined_whole_and_health_waits_for_an_operator() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("data/spool");
    std::fs::create_dir_all(&spool_dir).expect("spool dir");
    // A segment an older sluice left (replayed), and one whose intact record this build cannot
    // read: a record version from the future.
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/spool/legacy-json-v0.spool"
        ),
        spool_dir.join("00000000000000000001.spool"),
    )
    .expect("copy fixture");
    let payload = [42u8, 1, 2, 3];
    let mut unreadable = b"SLSPOOL2".to_vec();
    unreadable.extend((payload.len() as u32).to_le_bytes());
    unreadable.extend(crc32c::crc32c(&payload).to_le_bytes());
    unreadable.extend(payload);
    std::fs::write(spool_dir.join("00000000000000000002.spool"), &unreadable)
        .expect("write segment");

    let server = TestServer::start(ServerSpec {
        dir: Some(dir.path().to_owned()),
        ..ServerSpec::with_database(&database.url)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while database
        .scalar("SELECT count(*) FROM events WHERE service = 'legacy-svc'")
        .await
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "legacy segment not replayed:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quarantined = spool_dir.join("quarantine/00000000000000000002.spool");
    assert_eq!(
        std::fs::read(&quarantined).expect("kept in quarantine"),
        unreadable,
        "kept byte for byte"
    );
    wait_for_status(&server, ServingStatus::NotServing).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "sluice_spool_quarantined_segments", ""),
        1.0
    );
    assert_eq!(
        metric_sum(&metrics, "sluice_spool_bytes", ""),
        0.0,
        "a quarantined segment is not spool waiting to replay"
    );
    assert!(server.logs().contains("quarantine"));

    // The operator takes the segment away: ingest serves again, without a restart.
    std::fs::remove_file(&quarantined).expect("operator removes it");
    wait_for_status(&server, ServingStatus::Serving).await;
}
