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

/// A server whose buffer holds three 200-event requests and whose writers hold each batch open
/// for 250 ms: senders meet RESOURCE_EXHAUSTED and must resend.
async fn small_buffer_server(database: &TestDatabase) -> TestServer {
    TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_BUFFER__MAX_EVENTS", "600")
            .env("SLUICE_BUFFER__ADMIT_WAIT", "0s")
            .env("SLUICE_WRITER__FLUSH_INTERVAL", "250ms"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_client_publishes_queries_and_resends_after_refusals() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = small_buffer_server(&database).await;
    let node = std::env::var("TEST_SLUICE_NODE")
        .expect("TEST_SLUICE_NODE is unset: run the suite with scripts/test");
    let output = Command::new(node)
        .args(["--test", "test/"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/node"))
        .env("SLUICE_ADDR", format!("localhost:{}", server.addr.port()))
        .env("SLUICE_CERTS", &server.cert_dir)
        .output()
        .expect("run node --test");
    assert!(
        output.status.success(),
        "node tests failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'node-stream'")
            .await,
        3_000
    );
}

/// `sluice <args>` against `server`, with its dev certificates.
fn sluice_client(server: &TestServer, args: &[&str]) -> std::process::Output {
    sluice_command(server, args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run sluice")
}

/// The `sluice <args>` command, pointed at `server` with its dev certificates.
fn sluice_command(server: &TestServer, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(args)
        .args([
            "--addr",
            &format!("https://localhost:{}", server.addr.port()),
        ])
        .arg("--ca")
        .arg(server.cert_dir.join("ca.pem"))
        .arg("--cert")
        .arg(server.cert_dir.join("client.pem"))
        .arg("--key")
        .arg(server.cert_dir.join("client.key"));
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_send_streams_a_file_resends_refusals_and_writes_rejects_exactly_once() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = small_buffer_server(&database).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    let mut file = std::fs::File::create(&input).expect("create");
    for index in 0..5_000 {
        // No ids: `sluice send` makes them, so the resends below are stored once.
        writeln!(
            file,
            r#"{{"service":"cli","message":"event {index}","user_id":"u-{}"}}"#,
            index % 7
        )
        .expect("write");
    }
    writeln!(file, r#"{{"service":"NOT VALID","message":"rejected"}}"#).expect("write");
    writeln!(file, "{{not json").expect("write");
    drop(file);
    let rejects = dir.path().join("rejects.ndjson");
    let output = sluice_client(
        &server,
        &[
            "send",
            input.to_str().expect("utf-8"),
            "--batch",
            "200",
            "--rejects",
            rejects.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("summary");
    assert_eq!(
        (
            summary["accepted"].as_u64(),
            summary["rejected"].as_u64(),
            summary["invalid_lines"].as_u64()
        ),
        (Some(5_000), Some(1), Some(1)),
        "{summary}"
    );
    assert!(
        summary["resent"].as_u64() > Some(0),
        "the buffer never filled: {summary}"
    );
    let rejected: Vec<serde_json::Value> = std::fs::read_to_string(&rejects)
        .expect("rejects")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    let mut lines: Vec<u64> = rejected
        .iter()
        .filter_map(|record| record["line"].as_u64())
        .collect();
    lines.sort_unstable();
    assert_eq!(lines, [5_001, 5_002], "{rejected:?}");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'cli'")
            .await,
        5_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_query_export_delete_and_stats_work_from_a_shell() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut ingest = server.ingest_client().await;
    let events: Vec<sluice::proto::Event> = (0..5)
        .map(|index| sluice::proto::Event {
            user_id: format!("u-{}", index % 2),
            ..common::event("shell", &format!("line {index}"))
        })
        .collect();
    common::publish(&mut ingest, events).await;

    // Not a terminal: NDJSON, and --all follows the page tokens.
    let output = sluice_client(
        &server,
        &["query", "--service", "shell", "--limit", "2", "--all"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let queried: std::collections::BTreeSet<String> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).expect("json");
            event["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(queried.len(), 5);

    let dir = tempfile::tempdir().expect("tempdir");
    let exported = dir.path().join("u-0.ndjson");
    let output = sluice_client(
        &server,
        &[
            "export",
            "--user-id",
            "u-0",
            "-o",
            exported.to_str().expect("utf-8"),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&exported)
            .expect("export")
            .lines()
            .count(),
        3
    );
    assert!(!dir.path().join("u-0.ndjson.partial").exists());
    // Interrupted midway (one line written, the next torn): a rerun resumes, writing each
    // event once.
    let complete = std::fs::read_to_string(&exported).expect("export");
    let lines: Vec<&str> = complete.lines().collect();
    let resumed = dir.path().join("again.ndjson");
    std::fs::write(
        dir.path().join("again.ndjson.partial"),
        format!("{}\n{}", lines[0], &lines[1][..lines[1].len() / 2]),
    )
    .expect("partial");
    let output = sluice_client(
        &server,
        &[
            "export",
            "--user-id",
            "u-0",
            "-o",
            resumed.to_str().expect("utf-8"),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("resuming"));
    let mut again: Vec<String> = std::fs::read_to_string(&resumed)
        .expect("resumed")
        .lines()
        .map(str::to_owned)
        .collect();
    let mut first: Vec<String> = lines.iter().map(|line| (*line).to_owned()).collect();
    again.sort();
    first.sort();
    assert_eq!(again, first, "every event exactly once");

    // Without --yes and without a terminal to ask on, nothing is deleted.
    let output = sluice_client(&server, &["delete", "--user-id", "u-0"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("would delete 3 events"));
    assert_eq!(database.scalar("SELECT count(*) FROM events").await, 5);
    let output = sluice_client(&server, &["delete", "--user-id", "u-0", "--yes"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deleted: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(deleted["deleted"], 3);

    let output = sluice_client(&server, &["stats"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        text.contains("events stored: 2") && text.contains("shell"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_tail_follows_new_events_of_its_service_as_they_are_stored() {
    use std::io::BufRead;
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut child = sluice_command(&server, &["tail", "--service", "tailed"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start sluice tail");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let message_of = |line: &str| -> String {
        let event: serde_json::Value = serde_json::from_str(line).expect("json line");
        event["message"].as_str().unwrap_or_default().to_owned()
    };
    let mut ingest = server.ingest_client().await;
    // Until the subscription is in place, a probe per 200 ms.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        common::publish(&mut ingest, vec![common::event("tailed", "probe")]).await;
        if let Ok(line) = received.recv_timeout(std::time::Duration::from_millis(200)) {
            assert_eq!(message_of(&line), "probe");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tail never showed an event"
        );
    }
    while received
        .recv_timeout(std::time::Duration::from_millis(300))
        .is_ok()
    {}

    let mut events = vec![common::event("other", "not followed")];
    events.extend((0..5).map(|index| common::event("tailed", &format!("live {index}"))));
    common::publish(&mut ingest, events).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let line = received
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a tailed event");
        // A probe sent before the subscription showed may still arrive.
        let message = message_of(&line);
        if message != "probe" {
            seen.push(message);
        }
    }
    assert_eq!(seen, ["live 0", "live 1", "live 2", "live 3", "live 4"]);
    assert!(
        received
            .recv_timeout(std::time::Duration::from_millis(500))
            .is_err(),
        "another service's event was shown"
    );
    // A server shutting down ends its Tail streams instead of waiting for them.
    server.terminate();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "tail kept the server from stopping"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The fenced block after `heading` in the README.
fn readme_block(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let section = readme.split(heading).nth(1).expect("the section");
    let block = section.split("```sh\n").nth(1).expect("a sh block");
    block.split("```").next().expect("its end").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_shell_examples_run_as_written() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let work = tempfile::tempdir().expect("tempdir");
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_sluice"))
        .parent()
        .expect("bin dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let block = readme_block("## Send and read from a shell");
    let mut ran = 0;
    for line in block
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
    {
        // `tail` follows forever: it must start and show nothing wrong for a second.
        let command = if line.starts_with("sluice tail") {
            let command = line.split("  #").next().unwrap_or(line);
            format!("timeout 2 {command}; test $? -eq 124")
        } else {
            line.to_owned()
        };
        let output = Command::new("bash")
            .args(["-c", &command])
            .current_dir(work.path())
            .env("PATH", &path)
            .env(
                "SLUICE_ADDR",
                format!("https://localhost:{}", server.addr.port()),
            )
            .env("SLUICE_CA", server.cert_dir.join("ca.pem"))
            .env("SLUICE_CERT", server.cert_dir.join("client.pem"))
            .env("SLUICE_KEY", server.cert_dir.join("client.key"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run bash");
        assert!(
            output.status.success(),
            "README line failed: {line}\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} lines");
    // What the block did: one event sent, queried, exported, deleted.
    let exported = std::fs::read_to_string(work.path().join("u-1.ndjson")).expect("export");
    assert_eq!(exported.lines().count(), 1);
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'u-1'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_installs_as_a_package_with_its_stubs_and_publishes() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let python = std::env::var("TEST_SLUICE_PYTHON")
        .expect("TEST_SLUICE_PYTHON is unset: run the suite with scripts/test");
    let target = tempfile::tempdir().expect("tempdir");
    // Built from a copy: setuptools leaves build/ and *.egg-info next to what it builds.
    let source = tempfile::tempdir().expect("tempdir");
    let package = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");
    let copied = Command::new("cp")
        .arg("-r")
        .args(
            ["pyproject.toml", "README.md", "sluice_client.py", "sluice"]
                .map(|name| format!("{package}/{name}")),
        )
        .arg(source.path())
        .status()
        .expect("cp");
    assert!(copied.success());
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--no-build-isolation", "--target"])
        .arg(target.path())
        .arg(source.path())
        .output()
        .expect("pip install");
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    assert!(target.path().join("sluice/v1/ingest_pb2_grpc.py").exists());
    // Run from the install, away from the checkout: the shipped stubs are used, none generated.
    let installed_client = |args: &[&str]| {
        Command::new(&python)
            .args(["-m", "sluice_client", "--addr"])
            .arg(format!("localhost:{}", server.addr.port()))
            .arg("--certs")
            .arg(&server.cert_dir)
            .args(args)
            .current_dir(target.path())
            .env("PYTHONPATH", target.path())
            .output()
            .expect("run the installed package")
    };
    let output = installed_client(&[
        "publish",
        "--service",
        "pip",
        "--message",
        "from the package",
    ]);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!target.path().join("gen").exists(), "stubs were generated");
    // Query through the package: every page, as NDJSON.
    let output = installed_client(&["query", "--service", "pip", "--limit", "1"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["message"], "from the package");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'pip'")
            .await,
        1
    );
}
