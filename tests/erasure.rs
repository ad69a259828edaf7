//! Erasure across nodes: a Delete or Anonymize served by one node reaches events another node
//! acknowledged while it could not reach PostgreSQL (in its spool), whenever they are written.

mod common;

use std::time::Duration;

use common::{ServerSpec, TestDatabase, TestServer, event, metric_sum, proxy::Proxy, publish};
use sluice::proto::{AnonymizeRequest, DeleteRequest, Event};

fn of(user: &str, message: &str) -> Event {
    Event {
        user_id: user.to_owned(),
        ..event("erasure", message)
    }
}

/// Stored events of `user` (plain ids: no pseudonymization here).
async fn count(database: &TestDatabase, user: &str) -> i64 {
    database
        .scalar(&format!(
            "SELECT count(*) FROM events WHERE service = 'erasure' AND user_id = '{user}'"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_acknowledged_before_a_delete_returns_is_never_found_after_it_on_any_node() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // Node A reaches PostgreSQL directly; node B through a proxy the test cuts.
    let a = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let proxy = Proxy::start(database.address()).await;
    let b_url = database.url_via(proxy.port);
    let b = TestServer::start(
        ServerSpec::with_database(&b_url)
            .env("SLUICE_BREAKER__FAILURE_THRESHOLD", "1")
            .env("SLUICE_WRITER__WRITE_TIMEOUT", "2s")
            .env("SLUICE_WRITER__RETRY_MAX_BACKOFF", "200ms"),
    )
    .await;

    // B loses PostgreSQL; what it acknowledges now is in its spool.
    proxy.cut();
    let mut b_ingest = b.ingest_client().await;
    let spooled = vec![
        of("forget-me", "b 1"),
        of("forget-me", "b 2"),
        of("forget-me", "b 3"),
        of("anonymize-me", "b 4"),
        of("keep-me", "b 5"),
        of("keep-me", "b 6"),
    ];
    let acked = publish(&mut b_ingest, spooled).await;
    assert_eq!(acked.accepted, 6, "acknowledged from the spool");
    b.wait_for_metrics("the spooled events", |metrics| {
        metric_sum(metrics, "sluice_events_spooled_total", "") >= 6.0
    })
    .await;

    // The Delete and the Anonymize are served by A, which cannot see B's spool.
    let mut a_query = a.query_client().await;
    a_query
        .delete(DeleteRequest {
            user_id: "forget-me".to_owned(),
            ..Default::default()
        })
        .await
        .expect("delete on A");
    a_query
        .anonymize(AnonymizeRequest {
            user_id: "anonymize-me".to_owned(),
            ..Default::default()
        })
        .await
        .expect("anonymize on A");

    // B gets PostgreSQL back and replays its spool: the erasures apply to what it writes.
    proxy.restore();
    b.wait_for_metrics("the spool replayed", |metrics| {
        metric_sum(metrics, "sluice_events_replayed_total", "") >= 6.0
    })
    .await;
    assert_eq!(
        count(&database, "forget-me").await,
        0,
        "deleted on every node"
    );
    assert_eq!(
        count(&database, "anonymize-me").await,
        0,
        "anonymized on every node"
    );
    assert_eq!(
        database
            .scalar(
                "SELECT count(*) FROM events WHERE service = 'erasure' AND message = 'b 4' \
                 AND user_id LIKE 'anon:%'"
            )
            .await,
        1,
        "the anonymized event stays, under its pseudonym"
    );
    assert_eq!(
        count(&database, "keep-me").await,
        2,
        "other users' events are kept"
    );
    assert!(
        metric_sum(&b.metrics().await, "sluice_events_erased_total", "") >= 3.0,
        "the erased events are counted"
    );

    // Events of the user acknowledged after the Delete returned are the user's new data.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut a_ingest = a.ingest_client().await;
    publish(&mut a_ingest, vec![of("forget-me", "later")]).await;
    assert_eq!(count(&database, "forget-me").await, 1);
}
