//! The shipped Grafana dashboard and Prometheus alerts against the real promtool and the real
//! server: the rules load and their unit tests pass, every dashboard query parses, and every
//! metric either names is one the server exports (histograms with buckets).

mod common;

use std::{collections::BTreeSet, path::Path, process::Command};

use common::{ServerSpec, TestDatabase, TestServer, event, publish};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn promtool(args: &[&str], dir: &Path) -> String {
    let promtool = std::env::var("TEST_SLUICE_PROMTOOL")
        .expect("TEST_SLUICE_PROMTOOL is unset: run the suite with scripts/test");
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every `sluice_*` name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let names = regex::Regex::new(r"sluice_[a-z_]+").expect("regex");
    names
        .find_iter(text)
        .map(|name| {
            let name = name.as_str();
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
                .to_owned()
        })
        .collect()
}

fn dashboard() -> serde_json::Value {
    let text =
        std::fs::read_to_string(format!("{ROOT}/deploy/grafana/sluice.json")).expect("dashboard");
    serde_json::from_str(&text).expect("dashboard JSON")
}

fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn alert_rules_load_and_their_unit_tests_pass() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    let checked = promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_dashboard_is_a_classic_model_whose_every_query_parses() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "sluice-overview");
    assert!(dashboard["schemaVersion"].as_u64() >= Some(36));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables
            .iter()
            .any(|variable| variable["type"] == "datasource" && variable["name"] == "datasource")
    );
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|panel| panel["title"].as_str())
        .collect();
    for wanted in [
        "Ack latency",
        "Buffer utilization",
        "Rejected events",
        "Spool",
        "Read RPC latency",
    ] {
        assert!(
            titles.iter().any(|title| title.starts_with(wanted)),
            "no {wanted} panel"
        );
    }
    // Each query, with Grafana's variables filled in, as a recording rule promtool parses.
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, query) in queries.iter().enumerate() {
        let query = query
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{index}\n        expr: {}\n",
            serde_json::to_string(&query).expect("quoted")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("dashboard_rules.yml"), rules).expect("write");
    promtool(&["check", "rules", "dashboard_rules.yml"], dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_one_the_server_exports() {
    // Names the code records.
    let recorded = metric_names(
        &std::fs::read_to_string(format!("{ROOT}/src/metrics.rs")).expect("metrics.rs"),
    );
    let alerts =
        std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/alerts.yml")).expect("alerts");
    let used: BTreeSet<String> = metric_names(&alerts)
        .into_iter()
        .chain(
            dashboard_queries(&dashboard())
                .iter()
                .flat_map(|query| metric_names(query)),
        )
        .collect();
    let unknown: Vec<&String> = used.difference(&recorded).collect();
    assert!(unknown.is_empty(), "used but never recorded: {unknown:?}");

    // A live server exports the histograms with buckets, so they aggregate across nodes.
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut ingest = server.ingest_client().await;
    publish(
        &mut ingest,
        vec![event("metrics", "one"), event("metrics", "two")],
    )
    .await;
    let mut query =
        sluice::proto::query_service_client::QueryServiceClient::new(server.channel().await);
    query
        .stats(sluice::proto::StatsRequest::default())
        .await
        .expect("stats");
    let exposition = server.metrics().await;
    for histogram in [
        "sluice_ack_latency_seconds",
        "sluice_event_bytes",
        "sluice_request_events",
        "sluice_batch_events",
        "sluice_batch_write_seconds",
        "sluice_rpc_duration_seconds",
    ] {
        assert!(
            exposition.contains(&format!("{histogram}_bucket{{")),
            "{histogram} has no buckets:\n{exposition}"
        );
    }
    assert!(exposition.contains(r#"sluice_rpc_duration_seconds_count{method="Stats",code="OK"}"#));
}
