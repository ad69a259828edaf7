//! The Python client in clients/python, on real grpcio, against the real server.

mod common;

use std::{io::Write, process::Command};

use common::{ServerSpec, TestDatabase, TestServer, metric_sum};

fn python_client(server: &TestServer, args: &[&str]) -> serde_json::Value {
    let python = std::env::var("TEST_SLUICE_PYTHON")
        .expect("TEST_SLUICE_PYTHON is unset: run the suite with scripts/test");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/python/sluice_client.py"
    );
    let address = format!("localhost:{}", server.addr.port());
    let output = Command::new(python)
        .arg(script)
        .args(["--addr", &address, "--certs"])
        .arg(&server.cert_dir)
        .args(args)
        .output()
        .expect("run the python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("json summary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_publishes_streams_and_resends_after_refusals() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // A buffer of three requests, no admission wait, and writers that hold each batch open
    // for 250 ms: the streaming calls meet RESOURCE_EXHAUSTED and the client has to honour
    // RetryInfo and resend the rest.
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_BUFFER__MAX_EVENTS", "600")
            .env("SLUICE_BUFFER__ADMIT_WAIT", "0s")
            .env("SLUICE_WRITER__FLUSH_INTERVAL", "250ms"),
    )
    .await;

    let summary = python_client(
        &server,
        &[
            "publish",
            "--service",
            "py",
            "--message",
            "hello from grpcio",
            "--metadata",
            r#"{"userId":"u-py"}"#,
        ],
    );
    assert_eq!(summary["accepted"], 1);

    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    for index in 0..5_000 {
        let id = uuid::Uuid::new_v4();
        let line = format!(
            r#"{{"id":"{id}","timestamp":"{now}","service":"py","message":"event {index}","user_id":"u-{}"}}"#,
            index % 7
        );
        writeln!(file, "{line}").expect("write");
    }
    writeln!(file, r#"{{"service":"NOT VALID","message":"rejected"}}"#).expect("write");
    let path = file.path().to_str().expect("utf-8 path");

    let refused_before = buffer_full_refusals(&server).await;
    let summary = python_client(&server, &["ingest", path, "--batch", "200"]);
    assert_eq!(
        (summary["accepted"].as_u64(), summary["rejected"].as_u64()),
        (Some(5_000), Some(1))
    );
    assert!(
        summary["refusals"].as_u64() > Some(0),
        "the client stream was refused and resent: {summary}"
    );
    let refused_after_ingest = buffer_full_refusals(&server).await;
    assert!(
        refused_after_ingest > refused_before,
        "the server counted the refusals"
    );

    let summary = python_client(&server, &["stream", path, "--batch", "200"]);
    assert_eq!(
        (summary["accepted"].as_u64(), summary["rejected"].as_u64()),
        (Some(5_000), Some(1))
    );
    assert!(
        summary["refusals"].as_u64() > Some(0),
        "sequences of the bidi stream were refused and resent: {summary}"
    );
    assert!(buffer_full_refusals(&server).await > refused_after_ingest);

    // The same ids were sent twice: stored once.
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'py'")
            .await,
        5_001
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'u-py'")
            .await,
        1
    );
}

/// Events refused because the buffer was full, as the server counts them.
async fn buffer_full_refusals(server: &TestServer) -> f64 {
    metric_sum(
        &server.metrics().await,
        "sluice_events_refused_total",
        "reason=\"buffer_full\"",
    )
}
