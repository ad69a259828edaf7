//! The README's grpcurl commands, run with a real grpcurl binary against the real server.

mod common;

use std::process::Command;

use common::{ServerSpec, TestDatabase, TestServer};

fn grpcurl(server: &TestServer, args: &[&str]) -> (bool, String) {
    let binary = std::env::var("TEST_SLUICE_GRPCURL")
        .expect("TEST_SLUICE_GRPCURL is unset: run the suite with scripts/test");
    let certs = &server.cert_dir;
    let output = Command::new(binary)
        .arg("-cacert")
        .arg(certs.join("ca.pem"))
        .arg("-cert")
        .arg(certs.join("client.pem"))
        .arg("-key")
        .arg(certs.join("client.key"))
        .args(args)
        .output()
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_grpcurl_commands_list_check_and_publish() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let address = format!("localhost:{}", server.addr.port());

    let (ok, listing) = grpcurl(&server, &[&address, "list"]);
    assert!(ok, "{listing}");
    for service in ["sluice.v1.IngestService", "grpc.health.v1.Health"] {
        assert!(listing.contains(service), "{service} in {listing}");
    }

    let (ok, health) = grpcurl(&server, &[&address, "grpc.health.v1.Health/Check"]);
    assert!(ok && health.contains("SERVING"), "{health}");

    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = format!(
        r#"{{"events":[{{"service":"checkout","message":"order placed","timestamp":"{now}","metadata":{{"userId":"u-1","amount":42}}}}]}}"#
    );
    let (ok, published) = grpcurl(
        &server,
        &["-d", &body, &address, "sluice.v1.IngestService/Publish"],
    );
    assert!(
        ok && published.contains(r#""accepted": "1""#),
        "{published}"
    );
    assert_eq!(
        database
            .scalar(
                "SELECT count(*) FROM events WHERE user_id = 'u-1' AND metadata->>'amount' = '42'"
            )
            .await,
        1
    );

    // The README's QueryService commands.
    let since = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let query = format!(r#"{{"services":["checkout"],"start_time":"{since}","limit":50}}"#);
    let (ok, page) = grpcurl(
        &server,
        &["-d", &query, &address, "sluice.v1.QueryService/Query"],
    );
    assert!(
        ok && page.contains("order placed") && page.contains("ingestedAt"),
        "{page}"
    );
    let by_user =
        r#"{"user_id":"u-1","metadata_contains":{"amount":42},"order":"ORDER_OLDEST_FIRST"}"#;
    let (ok, page) = grpcurl(
        &server,
        &["-d", by_user, &address, "sluice.v1.QueryService/Query"],
    );
    assert!(ok && page.contains("order placed"), "{page}");
    let (ok, exported) = grpcurl(
        &server,
        &[
            "-d",
            r#"{"user_id":"u-1"}"#,
            &address,
            "sluice.v1.QueryService/Export",
        ],
    );
    assert!(
        ok && exported.contains(r#""totalEvents": "1""#) && exported.contains("ndjson"),
        "{exported}"
    );
    let (ok, stats) = grpcurl(
        &server,
        &[
            "-d",
            r#"{"top_n":5,"trend_hours":48}"#,
            &address,
            "sluice.v1.QueryService/Stats",
        ],
    );
    assert!(ok && stats.contains(r#""service": "checkout""#), "{stats}");
    let (ok, dry) = grpcurl(
        &server,
        &[
            "-d",
            r#"{"user_id":"u-1","dry_run":true}"#,
            &address,
            "sluice.v1.QueryService/Delete",
        ],
    );
    assert!(
        ok && dry.contains(r#""deleted": "1""#) && dry.contains(r#""dryRun": true"#),
        "{dry}"
    );
    let (ok, deleted) = grpcurl(
        &server,
        &[
            "-d",
            r#"{"user_id":"u-1"}"#,
            &address,
            "sluice.v1.QueryService/Delete",
        ],
    );
    assert!(ok && deleted.contains(r#""deleted": "1""#), "{deleted}");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'u-1'")
            .await,
        0
    );

    let (ok, described) = grpcurl(&server, &[&address, "describe", "sluice.v1.Event"]);
    assert!(ok && described.contains("user_id"), "{described}");

    // Without the client certificate grpcurl is refused.
    let binary = std::env::var("TEST_SLUICE_GRPCURL").expect("grpcurl");
    let refused = Command::new(binary)
        .arg("-cacert")
        .arg(server.cert_dir.join("ca.pem"))
        .args(["-connect-timeout", "2", &address, "list"])
        .output()
        .expect("run grpcurl");
    assert!(!refused.status.success());
}
