//! Overload as stock clients meet it, against the real server and PostgreSQL: a herd of
//! grpc-js and grpcio calls with a plain service-config retry policy all get through a small
//! buffer (no herd forms: refused callers are told successive turns); a noisy principal is
//! held to its fair share while a quiet one is never refused; IngestStream acks carry credit.

mod common;

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{ServerSpec, TestDatabase, TestServer, channel_as, event, issue_certificate, request};
use futures::StreamExt;
use sluice::proto::{IngestRequest, ingest_service_client::IngestServiceClient};
use tonic::Code;

/// A server whose buffer holds ten 200-event requests; the other settings are the defaults.
async fn small_buffer_server(database: &TestDatabase) -> TestServer {
    TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_BUFFER__MAX_EVENTS", "2000"),
    )
    .await
}

/// Runs a herd script (`bench/overload/herd.{js,py}`) of `calls` calls of 200 events.
fn herd(server: &TestServer, program: &str, script: &str, calls: usize) -> serde_json::Value {
    let output = Command::new(program)
        .arg(format!(
            "{}/bench/overload/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("SLUICE_ADDR", format!("localhost:{}", server.addr.port()))
        .env("SLUICE_CERTS", &server.cert_dir)
        .env("CALLS", calls.to_string())
        .env("EVENTS", "200")
        .output()
        .expect("run the herd");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("json report")
}

fn tool(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| panic!("{variable} is unset: run with scripts/test"))
}

async fn every_call_of_a_stock_herd_gets_through(program: &str, script: &str) {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = small_buffer_server(&database).await;
    // 60 calls of 200 events against room for 10, then 4 times the load.
    for calls in [60, 240] {
        let report = herd(&server, program, script, calls);
        println!("{report}");
        assert_eq!(report["ok"], calls, "{report}\n{}", server.logs());
    }
    let refused = common::metric_sum(
        &server.metrics().await,
        "sluice_events_refused_total",
        "reason=\"buffer_full\"",
    );
    println!("{} refused attempts", refused / 200.0);
    assert!(refused > 0.0, "the buffer filled: the retries were needed");
    assert_eq!(
        database.scalar("SELECT count(*) FROM events").await,
        300 * 200,
        "each event stored once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_of_a_grpc_js_herd_with_a_stock_retry_policy_gets_through() {
    every_call_of_a_stock_herd_gets_through(&tool("TEST_SLUICE_NODE"), "herd.js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_of_a_grpcio_herd_with_a_stock_retry_policy_gets_through() {
    every_call_of_a_stock_herd_gets_through(&tool("TEST_SLUICE_PYTHON"), "herd.py").await;
}

fn batch(service: &str, count: usize) -> Vec<sluice::proto::Event> {
    (0..count)
        .map(|index| event(service, &format!("{service} {index}")))
        .collect()
}

/// While one principal floods from 16 tasks, another sending 100 events every 100 ms is never
/// refused: the noisy one is held to its share and refused instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_principal_is_never_refused_while_another_floods() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = small_buffer_server(&database).await;
    issue_certificate(&server, "noisy");
    issue_certificate(&server, "quiet");
    let stop = Arc::new(AtomicBool::new(false));
    let noisy_refused = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for _ in 0..16 {
        let mut client = IngestServiceClient::new(channel_as(&server, "noisy").await);
        let (stop, refused) = (stop.clone(), noisy_refused.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.publish(request(batch("noisy", 200))).await {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(status) => panic!("noisy: {status:?}"),
                }
            }
        }));
    }
    // The flood fills the buffer before the quiet one first sends: the writers are held by a
    // lock until the noisy principal is refused, whatever the machine's speed.
    let stalled = database.stall_writers().await;
    while noisy_refused.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut quiet = IngestServiceClient::new(channel_as(&server, "quiet").await);
    let mut quiet_refusals = Vec::new();
    // Its first request is admitted into a full buffer (and waits for its commit); the
    // noisy one, contended now, is refused for its share.
    let first = {
        let mut quiet = quiet.clone();
        tokio::spawn(async move { quiet.publish(request(batch("quiet", 100))).await })
    };
    while common::metric_sum(
        &server.metrics().await,
        "sluice_events_refused_total",
        "reason=\"over_share\"",
    ) == 0.0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    TestDatabase::resume_writers(stalled).await;
    if let Err(status) = first.await.expect("first quiet request") {
        quiet_refusals.push(status.message().to_owned());
    }
    for _ in 1..40 {
        if let Err(status) = quiet.publish(request(batch("quiet", 100))).await {
            quiet_refusals.push(status.message().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        task.await.expect("flood task");
    }
    let metrics = server.metrics().await;
    let over_share = common::metric_sum(
        &metrics,
        "sluice_events_refused_total",
        "reason=\"over_share\"",
    );
    println!(
        "noisy refused {} times ({over_share} events over its share); quiet refused {}",
        noisy_refused.load(Ordering::Relaxed),
        quiet_refusals.len()
    );
    assert!(
        quiet_refusals.is_empty(),
        "quiet was refused: {quiet_refusals:?}"
    );
    assert!(
        over_share > 0.0,
        "the noisy principal was held to its share"
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'quiet'")
            .await,
        4_000
    );
}

/// Each IngestStream ack says how many more events the sender may have in flight: the
/// buffer's free room, less while it is under pressure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stream_acks_carry_the_credit_of_free_room() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = small_buffer_server(&database).await;
    let mut client = server.ingest_client().await;
    let requests = futures::stream::iter((0..3).map(|sequence| IngestRequest {
        events: batch("credit", 100),
        sequence,
    }));
    let mut acks = client
        .ingest_stream(requests)
        .await
        .expect("stream")
        .into_inner();
    let mut credits = Vec::new();
    while let Some(ack) = acks.next().await {
        let ack = ack.expect("ack");
        assert_eq!(ack.code, 0, "{ack:?}");
        credits.push(ack.credit_events.expect("credit"));
        assert!(ack.credit_bytes.expect("byte credit") > 0);
    }
    assert_eq!(credits.len(), 3);
    assert!(
        credits.iter().all(|credit| *credit > 0 && *credit <= 2_000),
        "{credits:?}"
    );
}
