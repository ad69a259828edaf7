//! The shipped Grafana dashboard and Prometheus alerts against the real promtool and the real
//! server: the rules load and their unit tests pass, every dashboard query parses, and every
//! metric either names is one the server exports (histograms with buckets).

mod common;

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{ServerSpec, TestDatabase, TestServer, event, free_port, publish};

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
    let sources: String = std::fs::read_dir(format!("{ROOT}/src/metrics"))
        .expect("src/metrics")
        .map(|entry| std::fs::read_to_string(entry.expect("entry").path()).expect("source"))
        .collect();
    let recorded = metric_names(&sources);
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
    let mut query = server.query_client().await;
    query
        .stats(sluice::proto::StatsRequest::default())
        .await
        .expect("stats");
    let exposition = server.metrics().await;
    for histogram in [
        "sluice_ack_latency_seconds",
        "sluice_event_commit_seconds",
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

/// Right after start, before any traffic, every series the dashboard and the alert rules use
/// is on `/metrics` (at 0), so that a `rate()` ratio or an `absent()` rule has something to
/// work on and no panel says "No data". Backups are off here: their series may be missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_and_alerts_use_exists_right_after_start() {
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
    common::init_crypto();
    let database = TestDatabase::create().await;
    // A principal with a rate limit, so that its series exists too.
    let server = TestServer::start(ServerSpec::with_database(&database.url).toml(
        r#"
[[auth.principals]]
name = "client"
scopes = ["admin", "ingest"]
events_per_second = 100000
"#,
    ))
    .await;
    let exported = metric_names(&server.metrics().await);
    let off = [
        "sluice_backup_last_finished_timestamp_seconds",
        "sluice_wal_archive_failures",
    ];
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !exported.contains(*name) && !off.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the alerts, absent right after start: {missing:?}"
    );
}

/// A child process killed when the test ends, pass or fail.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /api/v1/<path>` of Prometheus, as JSON.
async fn prometheus_api(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    params: &[(&str, &str)],
) -> serde_json::Value {
    let url =
        reqwest::Url::parse_with_params(&format!("{base}/api/v1/{path}"), params).expect("url");
    let response = client.get(url).send().await.expect("prometheus answers");
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON from prometheus: {text}"))
}

/// A PromQL instant query; panics unless Prometheus accepts it. Returns the result series.
async fn instant_query(
    client: &reqwest::Client,
    base: &str,
    query: &str,
) -> Vec<serde_json::Value> {
    let answer = prometheus_api(client, base, "query", &[("query", query)]).await;
    assert_eq!(answer["status"], "success", "{query}: {answer}");
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_a_live_server_evaluates_every_dashboard_and_alert_expression() {
    let binary = std::env::var("TEST_SLUICE_PROMETHEUS")
        .expect("TEST_SLUICE_PROMETHEUS is unset: run the suite with scripts/test");
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let metrics = server.metrics_addr.expect("metrics address");

    // Prometheus scrapes the server every second and evaluates the shipped alert rules.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: [\"{metrics}\"]\n",
        rules =
            serde_json::to_string(&format!("{ROOT}/deploy/prometheus/alerts.yml")).expect("quoted"),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _prometheus = KillOnDrop(
        Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let client = reqwest::Client::new();

    // Traffic while Prometheus scrapes: stored events, a rejected one, reads.
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    let mut bad = event("metrics", "bad");
    bad.service = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    loop {
        publish(
            &mut ingest,
            vec![event("metrics", "one"), event("other-service", "two")],
        )
        .await;
        ingest
            .publish(common::request(vec![
                bad.clone(),
                event("metrics", "three"),
            ]))
            .await
            .expect("partial success");
        query
            .stats(sluice::proto::StatsRequest::default())
            .await
            .expect("stats");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Enough scrapes for every rate window below to hold two samples with increases.
        if rounds >= 12
            && let Ok(answer) = client
                .get(format!(
                    "{base}/api/v1/query?query=sluice_events_received_total"
                ))
                .send()
                .await
            && let Ok(text) = answer.text().await
            && text.contains("\"result\":[{")
        {
            break;
        }
        assert!(Instant::now() < deadline, "prometheus never scraped sluice");
    }
    // Three more seconds of traffic after the first scrape, for rates over the window.
    for _ in 0..12 {
        publish(&mut ingest, vec![event("metrics", "more")]).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every dashboard query parses and runs; the core panels return data.
    let dashboard = dashboard();
    let core = [
        "Events per second",
        "Ack latency",
        "Processing time per event",
        "Rejected events",
        "Event size",
        "Events per request",
        "Buffer utilization",
        "Database, circuit and health",
        "Batch size and write time",
        "Ingest RPC latency",
        "Read RPC latency",
        "Top services",
        "Top principals",
    ];
    let mut empty_core = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default();
        let mut series = 0;
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            let expr = expr
                .replace("$__rate_interval", "4s")
                .replace("$instance", ".*");
            series += instant_query(&client, &base, &expr).await.len();
        }
        if series == 0 && core.iter().any(|wanted| title.starts_with(wanted)) {
            empty_core.push(title.to_owned());
        }
    }
    assert!(
        empty_core.is_empty(),
        "core panels without data: {empty_core:?}"
    );

    // Every alert rule is loaded and evaluates without error against the live series.
    let alerts =
        std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/alerts.yml")).expect("alerts");
    let shipped = alerts.matches("- alert:").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = prometheus_api(&client, &base, "rules", &[]).await;
        let rules: Vec<serde_json::Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules
            .iter()
            .filter(|rule| {
                rule["lastEvaluation"]
                    .as_str()
                    .is_some_and(|at| !at.starts_with("0001"))
            })
            .count();
        if rules.len() == shipped && evaluated == shipped {
            for rule in &rules {
                assert_eq!(rule["health"], "ok", "{rule}");
                instant_query(&client, &base, rule["query"].as_str().expect("query")).await;
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {shipped} rules loaded, {evaluated} evaluated: {answer}",
            rules.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The methods of every service in the proto's descriptor set, by name.
fn proto_methods() -> Vec<String> {
    use prost::Message;
    let descriptors = prost_types::FileDescriptorSet::decode(sluice::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    descriptors
        .file
        .iter()
        .flat_map(|file| &file.service)
        .flat_map(|service| &service.method)
        .map(|method| method.name().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_has_a_duration_series_with_its_code_once_called() {
    use sluice::proto::{
        AnonymizeRequest, AuditRequest, DeleteRequest, ExportRequest, OptInRequest, OptOutRequest,
        QueryRequest, RestoreRequest, StatsRequest, TailRequest,
    };
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    let user = |user_id: &str| user_id.to_owned();
    publish(&mut ingest, vec![event("rpcs", "published")]).await;
    ingest
        .ingest(tokio_stream::iter(vec![common::request(vec![event(
            "rpcs", "streamed",
        )])]))
        .await
        .expect("ingest");
    let mut acks = ingest
        .ingest_stream(tokio_stream::iter(vec![common::request(vec![event(
            "rpcs", "acked",
        )])]))
        .await
        .expect("ingest stream")
        .into_inner();
    while acks.message().await.expect("ack").is_some() {}
    query.query(QueryRequest::default()).await.expect("query");
    let mut chunks = query
        .export(ExportRequest {
            user_id: user("u-1"),
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    while chunks.message().await.expect("chunk").is_some() {}
    query.stats(StatsRequest::default()).await.expect("stats");
    query.audit(AuditRequest::default()).await.expect("audit");
    let now = chrono::Utc::now();
    let mut progress = query
        .restore(RestoreRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: now.timestamp() - 86_400,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: now.timestamp(),
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("restore")
        .into_inner();
    while progress.message().await.expect("progress").is_some() {}
    query
        .opt_out(OptOutRequest {
            user_id: user("u-1"),
            ..Default::default()
        })
        .await
        .expect("opt out");
    query
        .opt_in(OptInRequest {
            user_id: user("u-1"),
            ..Default::default()
        })
        .await
        .expect("opt in");
    query
        .anonymize(AnonymizeRequest {
            user_id: user("u-1"),
            ..Default::default()
        })
        .await
        .expect("anonymize");
    query
        .delete(DeleteRequest {
            user_id: user("u-1"),
            ..Default::default()
        })
        .await
        .expect("delete");
    // A refused call is recorded with its code, and a stream the client drops as CANCELLED.
    let refused = query
        .query(QueryRequest {
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .expect_err("limit too large");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    drop(query.tail(TailRequest::default()).await.expect("tail"));

    let methods = proto_methods();
    assert_eq!(methods.len(), 13, "{methods:?}");
    let series = |text: &str, method: &str, code: &str| {
        text.lines().any(|line| {
            line.starts_with("sluice_rpc_duration_seconds_count{")
                && line.contains(&format!("method=\"{method}\""))
                && line.contains(&format!("code=\"{code}\""))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = server.metrics().await;
        let missing: Vec<&String> = methods
            .iter()
            .filter(|method| {
                let code = if *method == "Tail" { "CANCELLED" } else { "OK" };
                !series(&text, method, code)
            })
            .collect();
        if missing.is_empty() && series(&text, "Query", "INVALID_ARGUMENT") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no duration series for {missing:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
