//! Graceful shutdown: SIGTERM with events in flight loses none that were acknowledged, and
//! the buffer is drained into PostgreSQL before the process exits, and an idle server exits
//! cleanly (status 0) too.

mod common;

use std::{sync::Arc, time::Duration};

use common::{ServerSpec, TestDatabase, TestServer, event};
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_events_in_flight_loses_no_acknowledged_event() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let mut server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_WRITER__FLUSH_INTERVAL", "200ms"),
    )
    .await;
    let acknowledged = Arc::new(Mutex::new(0u64));
    // The senders that have had a publish acknowledged.
    let through = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let mut senders = tokio::task::JoinSet::new();
    for sender in 0..4 {
        let mut client = server.ingest_client().await;
        let acknowledged = acknowledged.clone();
        let through = through.clone();
        senders.spawn(async move {
            for round in 0.. {
                let events = (0..200)
                    .map(|offset| event("shutdown", &format!("{sender}-{round}-{offset}")))
                    .collect();
                match client.publish(common::request(events)).await {
                    Ok(response) => {
                        *acknowledged.lock().await += response.into_inner().accepted;
                        through.lock().await.insert(sender);
                    }
                    Err(status) => {
                        assert!(
                            matches!(
                                status.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::Cancelled
                                    | tonic::Code::Unknown
                            ),
                            "refusal during shutdown is retryable: {status:?}"
                        );
                        return round;
                    }
                }
            }
            unreachable!("the loop ends with the server")
        });
    }
    // Every sender has had events through before the signal.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while through.lock().await.len() < 4 {
        assert!(std::time::Instant::now() < deadline, "no events through");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.terminate();
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "clean exit: {status}\n{}", server.logs());
    while let Some(rounds) = senders.join_next().await {
        assert!(
            rounds.expect("sender") > 0,
            "each sender got events through before the shutdown"
        );
    }
    let acknowledged = *acknowledged.lock().await as i64;
    let stored = database.scalar("SELECT count(*) FROM events").await;
    assert!(acknowledged > 0);
    // Every acknowledged event is stored; events admitted before the signal were drained too.
    assert!(
        stored >= acknowledged,
        "stored {stored} < acknowledged {acknowledged}"
    );
    assert!(server.logs().contains("all acknowledged events are stored"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_server_is_a_clean_exit() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let mut server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    // No connection is open: serving ends in the same poll as the signal.
    server.terminate();
    let status = server.wait(Duration::from_secs(30));
    assert!(status.success(), "clean exit: {status}\n{}", server.logs());
    assert!(!server.logs().contains("accept loop stopped"));
}
