//! Test harness: databases on the throwaway cluster started by `scripts/test`, and the real
//! `sluice` binary started on free ports with its own dev certificates.

#![allow(dead_code)]

pub mod archived;
pub mod otlp;
pub mod proxy;
pub mod streaming;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use sluice::proto::{
    Event, IngestRequest, IngestResponse, ingest_service_client::IngestServiceClient,
    query_service_client::QueryServiceClient,
};
use sqlx::{Connection, PgConnection};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// The throwaway S3 server (moto) that `scripts/test` runs: its endpoint and bucket, and the
/// `AWS_*` variables a server or command needs to reach it.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
}

impl S3 {
    pub fn from_env() -> Self {
        let endpoint = std::env::var("TEST_SLUICE_S3_ENDPOINT").expect(
            "TEST_SLUICE_S3_ENDPOINT is unset: run the suite with scripts/test, which starts moto",
        );
        let bucket =
            std::env::var("TEST_SLUICE_S3_BUCKET").unwrap_or_else(|_| "sluice-test".to_owned());
        Self { endpoint, bucket }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .to_vec()
    }
}

/// A KMS of one test's own: moto serving the AWS KMS API on a free loopback port, so that a
/// test can take it down. Killed when dropped.
pub struct Kms {
    child: Option<Child>,
    pub endpoint: String,
}

impl Kms {
    pub fn start() -> Self {
        let python = std::env::var("TEST_SLUICE_PYTHON")
            .expect("TEST_SLUICE_PYTHON is unset: run the suite with scripts/test");
        let port = free_port();
        let child = Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The `AWS_*` variables that reach it.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .to_vec()
    }

    /// Creates a symmetric key with `alias` (`alias/...`) through the AWS API (boto3).
    pub fn create_key(&self, alias: &str) {
        let python = std::env::var("TEST_SLUICE_PYTHON").expect("TEST_SLUICE_PYTHON");
        let output = Command::new(python)
            .args([
                "-c",
                "import sys, boto3\n\
                 kms = boto3.client('kms', endpoint_url=sys.argv[1], region_name='us-east-1', \
                 aws_access_key_id='test', aws_secret_access_key='test')\n\
                 key = kms.create_key()['KeyMetadata']['KeyId']\n\
                 kms.create_alias(AliasName=sys.argv[2], TargetKeyId=key)",
                &self.endpoint,
                alias,
            ])
            .output()
            .expect("create a KMS key");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Takes the KMS down.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the server in `server_dir` and waits for it to exit; its stderr. Fails if it is
/// still serving after 60 s.
pub fn start_expecting_refusal(
    server_dir: &Path,
    database_url: &str,
    env: &[(String, String)],
) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(server_dir.join("sluice.toml"))
        .env("DATABASE_URL", database_url)
        .env("SLUICE_DATA_DIR", server_dir.join("data"))
        .env("SLUICE_TLS__CERT_DIR", server_dir.join("certs"))
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(key, value)| (key, value)))
        .current_dir(server_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(!status.success(), "the server must refuse to start");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    stderr
}

/// A fresh database on the shared test cluster.
pub struct TestDatabase {
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url = std::env::var("TEST_SLUICE_ADMIN_URL")
            .expect("TEST_SLUICE_ADMIN_URL is unset: run the suite with scripts/test, which starts PostgreSQL");
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test cluster");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .expect("admin url has a database");
        Self {
            url: format!("{base}/{name}"),
        }
    }

    /// The address of the test cluster.
    pub fn address(&self) -> SocketAddr {
        let url = url::Url::parse(&self.url).expect("database url");
        format!(
            "{}:{}",
            url.host_str().expect("host"),
            url.port().unwrap_or(5432)
        )
        .parse()
        .expect("address")
    }

    /// The database's URL through `port` of this machine (a [`proxy::Proxy`] in front of it).
    pub fn url_via(&self, port: u16) -> String {
        let mut url = url::Url::parse(&self.url).expect("database url");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(port)).expect("port");
        url.to_string()
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to test database")
    }

    /// Holds a lock on `events` that blocks the writers' COPY (reads still work) until the
    /// returned connection is passed to [`TestDatabase::resume_writers`].
    pub async fn stall_writers(&self) -> PgConnection {
        let mut connection = self.connect().await;
        sqlx::query("BEGIN")
            .execute(&mut connection)
            .await
            .expect("begin");
        sqlx::query("LOCK TABLE events IN SHARE MODE")
            .execute(&mut connection)
            .await
            .expect("lock");
        connection
    }

    pub async fn resume_writers(mut connection: PgConnection) {
        sqlx::query("ROLLBACK")
            .execute(&mut connection)
            .await
            .expect("unlock");
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        let mut connection = self.connect().await;
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&mut connection)
            .await
            .expect("query")
    }
}

/// A running `sluice` process.
pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The OTLP/HTTP listener, when `otlp.http_listen` is set.
    pub otlp_http_addr: Option<SocketAddr>,
    pub cert_dir: PathBuf,
    /// Removed when the server is dropped (unless the spec named a directory of its own).
    _dir: tempfile::TempDir,
    /// Where the server runs: its data dir, certs and `sluice.toml` are here.
    base: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

/// How to start a server.
#[derive(Default, Clone)]
pub struct ServerSpec {
    /// Database URL; None runs the private cluster under the data dir.
    pub database_url: Option<String>,
    /// Extra `SLUICE_*` variables.
    pub env: Vec<(String, String)>,
    /// Extra flags.
    pub args: Vec<String>,
    /// Reuse this directory (data dir and certs) instead of a fresh one.
    pub dir: Option<PathBuf>,
    /// The `sluice.toml` to write in the server's directory before it starts.
    pub toml: Option<String>,
}

impl ServerSpec {
    pub fn with_database(url: &str) -> Self {
        Self {
            database_url: Some(url.to_owned()),
            ..Self::default()
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Runs in `dir` (its data dir, certs and `sluice.toml`) instead of a fresh directory.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Starts the server with this `sluice.toml`.
    pub fn toml(mut self, toml: &str) -> Self {
        self.toml = Some(toml.to_owned());
        self
    }
}

impl TestServer {
    pub async fn start(spec: ServerSpec) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = spec.dir.clone().unwrap_or_else(|| dir.path().to_owned());
        if let Some(toml) = &spec.toml {
            std::fs::write(base.join("sluice.toml"), toml).expect("write sluice.toml");
        }
        let cert_dir = base.join("certs");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(&spec.args)
            .env_remove("DATABASE_URL")
            .env("SLUICE_DATA_DIR", base.join("data"))
            .env("SLUICE_TLS__CERT_DIR", &cert_dir)
            .env("SLUICE_SHUTDOWN_TIMEOUT", "30s")
            .env("RUST_LOG", "info,sqlx=warn")
            // No closed day is indexed unless a test asks (tests/search.rs): a build in the
            // background (CREATE INDEX CONCURRENTLY) would race the tests that lock `events`
            // or change its indexes, and PostgreSQL would end one side as a deadlock.
            .env("SLUICE_SEARCH__INDEX_DELAY", "36500days")
            .current_dir(&base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(url) = &spec.database_url {
            command.env("DATABASE_URL", url);
        }
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addresses, found) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The "listening" lines name their listener (`grpc`, `metrics`).
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(listener) = json["listener"].as_str()
                    && let Some(address) = json["address"]
                        .as_str()
                        .and_then(|text| text.parse::<SocketAddr>().ok())
                {
                    let _ = addresses.send((listener.to_owned(), address));
                }
                sink.lock().expect("logs").push(line);
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut addr = None;
        let mut metrics_addr = None;
        // Logged before the gRPC listener's line.
        let mut otlp_http_addr = None;
        while addr.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match found.recv_timeout(remaining.min(Duration::from_millis(200))) {
                Ok((listener, address)) if listener == "grpc" => addr = Some(address),
                Ok((listener, address)) if listener == "otlp_http" => {
                    otlp_http_addr = Some(address)
                }
                Ok((_, address)) => metrics_addr = Some(address),
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "sluice exited during start-up ({status}):\n{}",
                            logs.lock().expect("logs").join("\n")
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "sluice did not start:\n{}",
                        logs.lock().expect("logs").join("\n")
                    );
                }
            }
        }
        Self {
            child: Some(child),
            addr: addr.expect("address"),
            metrics_addr,
            otlp_http_addr,
            cert_dir,
            _dir: dir,
            base,
            logs,
        }
    }

    /// The server's working directory (data dir, certs, `sluice.toml`).
    pub fn dir_path(&self) -> &Path {
        &self.base
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    /// Polls the server's metrics until `ready` holds of them (at most 60 s); `what` names
    /// the wait in the failure.
    pub async fn wait_for_metrics(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let metrics = self.metrics().await;
            if ready(&metrics) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what}:\n{metrics}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first log line holding `needle`, waiting for it: a line the server writes after
    /// its response reaches the test through a pipe and a reader thread, a moment later.
    pub async fn log_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .expect("logs")
                .iter()
                .find(|line| line.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line holds {needle:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A TLS config trusting the dev CA and presenting the dev client certificate.
    pub fn client_tls(&self) -> ClientTlsConfig {
        tls_from(&self.cert_dir)
    }

    pub async fn channel(&self) -> Channel {
        self.channel_with(Some(self.client_tls()))
            .await
            .expect("connect")
    }

    pub async fn channel_with(
        &self,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Channel, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint =
            Channel::from_shared(format!("{scheme}://localhost:{}", self.addr.port()))
                .expect("endpoint")
                .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        endpoint.connect().await
    }

    pub async fn ingest_client(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::new(self.channel().await)
    }

    pub async fn query_client(&self) -> QueryServiceClient<Channel> {
        QueryServiceClient::new(self.channel().await)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    }

    /// Sends SIGKILL: no drain, no cleanup, as in a crash.
    pub fn kill_hard(&mut self) {
        let child = self.child.as_mut().expect("running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit in {timeout:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fetches the Prometheus exposition text.
    pub async fn metrics(&self) -> String {
        let address = self.metrics_addr.expect("metrics endpoint");
        let url = format!("http://{address}/metrics");
        let output = Command::new("python3")
            .args(["-c", "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())", &url])
            .output()
            .expect("fetch metrics");
        String::from_utf8(output.stdout).expect("utf-8")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn tls_from(cert_dir: &Path) -> ClientTlsConfig {
    let read = |name: &str| std::fs::read(cert_dir.join(name)).expect("read cert");
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read("client.pem"), read("client.key")))
        .domain_name("localhost")
}

/// Issues a client certificate named `name` from the server's dev CA, with `sluice certs`.
pub fn issue_certificate(server: &TestServer, name: &str) {
    let status = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["certs", "--name", name, "--cert-dir"])
        .arg(&server.cert_dir)
        .arg("--out-dir")
        .arg(&server.cert_dir)
        .status()
        .expect("run sluice certs");
    assert!(status.success());
}

/// A channel presenting `name`'s certificate.
pub async fn channel_as(server: &TestServer, name: &str) -> Channel {
    let read = |file: &str| std::fs::read(server.cert_dir.join(file)).expect("read cert");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{name}.pem")),
            read(&format!("{name}.key")),
        ))
        .domain_name("localhost");
    server.channel_with(Some(tls)).await.expect("connect")
}

/// A request carrying `events` (sequence 0: only IngestStream reads it).
pub fn request(events: Vec<Event>) -> IngestRequest {
    IngestRequest {
        events,
        sequence: 0,
    }
}

/// Publishes `events` in one unary call and returns the response; panics on a failed call.
pub async fn publish(
    client: &mut IngestServiceClient<Channel>,
    events: Vec<Event>,
) -> IngestResponse {
    client
        .publish(request(events))
        .await
        .expect("publish")
        .into_inner()
}

/// Every event a query matches, following page tokens (a scanned page may be partial).
pub async fn query_all(
    client: &mut QueryServiceClient<Channel>,
    request: sluice::proto::QueryRequest,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut page_token = request.page_token.clone();
    loop {
        let page = client
            .query(sluice::proto::QueryRequest {
                page_token,
                ..request.clone()
            })
            .await
            .expect("query")
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

/// A valid event stamped now.
pub fn event(service: &str, message: &str) -> Event {
    let now = chrono::Utc::now();
    Event {
        id: uuid::Uuid::new_v4().to_string(),
        service: service.to_owned(),
        message: message.to_owned(),
        timestamp: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: now.timestamp_subsec_nanos() as i32,
        }),
        user_id: String::new(),
        metadata: None,
        ingested_at: None,
        trace_id: String::new(),
    }
}

/// `sluice lifecycle --once` with the server's `sluice.toml` and `env`, run to the end.
pub fn lifecycle_run(
    server: &TestServer,
    database_url: &str,
    env: &[(String, String)],
) -> std::process::Output {
    lifecycle_command(server, database_url, env)
        .output()
        .expect("run sluice lifecycle")
}

/// The command of [`lifecycle_run`], to start and wait for at will.
pub fn lifecycle_command(
    server: &TestServer,
    database_url: &str,
    env: &[(String, String)],
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args([
            "lifecycle",
            "--once",
            "--database-url",
            database_url,
            "--config",
        ])
        .arg(server.dir_path().join("sluice.toml"))
        .env("SLUICE_DATA_DIR", server.dir_path().join("data"))
        .envs(env.iter().map(|(key, value)| (key, value)))
        .env("RUST_LOG", "warn");
    command
}

/// [`lifecycle_run`] that must succeed; returns its JSON report.
pub fn lifecycle_once(
    server: &TestServer,
    database_url: &str,
    env: &[(String, String)],
) -> serde_json::Value {
    let output = lifecycle_run(server, database_url, env);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json report")
}

/// Sum of a counter (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(label_filter))
        .filter(|line| line[name.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The grpc.health.v1 status of the ingest service.
pub async fn ingest_status(server: &TestServer) -> ServingStatus {
    let mut client = HealthClient::new(server.channel().await);
    let request = HealthCheckRequest {
        service: "sluice.v1.IngestService".to_owned(),
    };
    let response = client
        .check(request)
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(response.status).expect("known status")
}

/// Waits (at most 30 s) until the ingest service reports `wanted`.
pub async fn wait_for_status(server: &TestServer, wanted: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ingest_status(server).await != wanted {
        assert!(
            Instant::now() < deadline,
            "health never became {wanted:?}:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A rustls client config trusting the dev CA and presenting the dev client certificate, for
/// tests that speak TLS below gRPC.
pub fn rustls_client_config(cert_dir: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(rustls_client_config_as(cert_dir, Some("client"), b"h2"))
}

/// A rustls client config trusting the dev CA, presenting the certificate `client` (issued
/// into `cert_dir`) or none, and offering `alpn`.
pub fn rustls_client_config_as(
    cert_dir: &Path,
    client: Option<&str>,
    alpn: &[u8],
) -> rustls::ClientConfig {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(cert_dir.join("ca.pem")).expect("ca.pem") {
        roots.add(ca.expect("ca cert")).expect("add ca");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match client {
        Some(client) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(cert_dir.join(format!("{client}.pem")))
                    .expect("client certificate")
                    .map(|cert| cert.expect("client cert"))
                    .collect();
            let key = PrivateKeyDer::from_pem_file(cert_dir.join(format!("{client}.key")))
                .expect("client key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client config")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// An HTTPS client (HTTP/1.1) for the server's OTLP/HTTP port, presenting the certificate
/// `client`, or none.
pub fn https_client(server: &TestServer, client: Option<&str>) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(rustls_client_config_as(
            &server.cert_dir,
            client,
            b"http/1.1",
        ))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("https client")
}

/// Opens a transaction on `locker` that holds the partition of the event with `message` in
/// ACCESS EXCLUSIVE mode (as a migration or a retention drop would) until it ends.
pub async fn lock_partition_of(locker: &mut sqlx::PgConnection, message: &str) {
    let partition: String =
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM events WHERE message = $1")
            .bind(message)
            .fetch_one(&mut *locker)
            .await
            .expect("partition");
    sqlx::query("BEGIN")
        .execute(&mut *locker)
        .await
        .expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {partition} IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut *locker)
    .await
    .expect("lock");
}
