//! The archive of a test: a server whose events past 7 days can be archived by
//! `sluice lifecycle`, on local files or the moto S3 server, and what the store holds.

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt;
use object_store::{
    ObjectStore, ObjectStoreExt, aws::AmazonS3Builder, local::LocalFileSystem, path::Path,
    prefix::PrefixStore,
};
use sha2::{Digest, Sha256};
use sluice::proto::query_service_client::QueryServiceClient;
use tonic::transport::Channel;

use chrono::{DateTime, Duration, NaiveTime, Utc};
use sluice::proto::{Event, ExportRequest};

use super::{S3, ServerSpec, TestDatabase, TestServer, event};

/// Where the archive of a test lives.
pub enum Store {
    /// `data_dir/archive`, the default.
    Files,
    /// `s3://<bucket>/<prefix>` on the moto server.
    S3 { prefix: String },
}

pub struct Archived {
    pub database: TestDatabase,
    pub server: TestServer,
    /// Variables for the server and `sluice lifecycle` (the AWS ones for S3).
    pub env: Vec<(String, String)>,
    pub objects: Arc<dyn ObjectStore>,
}

impl Archived {
    pub async fn start(store: Store, extra_toml: &str) -> Self {
        super::init_crypto();
        let database = TestDatabase::create().await;
        let s3 = S3::from_env();
        let (url, env) = match &store {
            Store::Files => (String::new(), Vec::new()),
            Store::S3 { prefix } => (format!("url = \"s3://{}/{prefix}\"\n", s3.bucket), s3.env()),
        };
        let mut spec = ServerSpec::with_database(&database.url).toml(&format!(
            "[lifecycle]\nenabled = false\n\n[archive]\nafter = \"7days\"\n{url}{extra_toml}"
        ));
        for (key, value) in &env {
            spec = spec.env(key, value);
        }
        let server = TestServer::start(spec).await;
        let objects: Arc<dyn ObjectStore> = match &store {
            Store::Files => {
                let root = server.dir_path().join("data/archive");
                Arc::new(PrefixStore::new(
                    LocalFileSystem::new(),
                    root.to_string_lossy().trim_matches('/'),
                ))
            }
            Store::S3 { prefix } => {
                let client = AmazonS3Builder::new()
                    .with_endpoint(&s3.endpoint)
                    .with_allow_http(true)
                    .with_bucket_name(&s3.bucket)
                    .with_access_key_id("test")
                    .with_secret_access_key("test")
                    .with_region("us-east-1")
                    .build()
                    .expect("s3 client");
                Arc::new(PrefixStore::new(client, prefix.as_str()))
            }
        };
        Self {
            database,
            server,
            env,
            objects,
        }
    }

    pub fn lifecycle(&self) -> serde_json::Value {
        super::lifecycle_once(&self.server, &self.database.url, &self.env)
    }

    pub async fn query_client(&self) -> QueryServiceClient<Channel> {
        self.server.query_client().await
    }

    /// The catalog: (path, rows, sha256) of every archived object.
    pub async fn catalog(&self) -> Vec<(String, i64, String)> {
        let mut connection = self.database.connect().await;
        sqlx::query_as("SELECT path, rows, sha256 FROM archives ORDER BY path")
            .fetch_all(&mut connection)
            .await
            .expect("archives")
    }

    /// Every object in the store (the probe leaves none).
    pub async fn stored_paths(&self) -> Vec<String> {
        let mut listed = self.objects.list(None);
        let mut paths = Vec::new();
        while let Some(meta) = listed.next().await {
            paths.push(meta.expect("list").location.to_string());
        }
        paths.sort();
        paths
    }

    /// The lines of an archived object, checked against its recorded sha256.
    pub async fn object_lines(&self, path: &str, sha256: &str) -> Vec<String> {
        let bytes = self
            .objects
            .get(&Path::from(path))
            .await
            .expect("get object")
            .bytes()
            .await
            .expect("object bytes");
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            sha256,
            "sha256 of {path}"
        );
        let text = zstd::decode_all(&bytes[..]).expect("zstd");
        String::from_utf8(text)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Every archived line, by event id, checking that no event is in two objects.
    pub async fn archived_lines(&self) -> BTreeMap<String, String> {
        let mut lines = BTreeMap::new();
        for (path, rows, sha256) in self.catalog().await {
            let object = self.object_lines(&path, &sha256).await;
            assert_eq!(object.len() as i64, rows, "rows of {path}");
            for line in object {
                let id = line_id(&line);
                assert!(
                    lines.insert(id.clone(), line).is_none(),
                    "{id} archived twice"
                );
            }
        }
        lines
    }

    pub async fn hot_rows(&self, condition: &str) -> i64 {
        self.database
            .scalar(&format!("SELECT count(*) FROM events WHERE {condition}"))
            .await
    }
}

/// The `id` of an NDJSON line.
pub fn line_id(line: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(line).expect("json line");
    json["id"].as_str().expect("id").to_owned()
}

/// Noon (UTC) `days` ago, plus `seconds`: far from day boundaries.
pub fn days_ago(days: i64, seconds: i64) -> DateTime<Utc> {
    (Utc::now() - Duration::days(days))
        .date_naive()
        .and_time(NaiveTime::from_hms_opt(12, 0, 0).expect("noon"))
        .and_utc()
        + Duration::seconds(seconds)
}

pub fn event_at(service: &str, user: &str, at: DateTime<Utc>, n: usize) -> Event {
    let mut event = event(service, &format!("{service} event {n} for {user}"));
    event.user_id = user.to_owned();
    event.timestamp = Some(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: (n as i32 % 1000) * 1000,
    });
    event.metadata = Some(number_n(n as f64));
    event
}

/// Metadata `{"n": n}`.
pub fn number_n(n: f64) -> sluice::proto::Metadata {
    let mut object = serde_json::Map::new();
    object.insert("n".to_owned(), serde_json::json!(n));
    object.into()
}

/// Orders on days 10 and 9 ago and payments 12 days ago (archived), and orders a day ago
/// (hot), for alice and bob.
pub fn fixture() -> Vec<Event> {
    let mut events = Vec::new();
    for (service, days, count) in [
        ("orders", 10, 40),
        ("orders", 9, 30),
        ("payments", 12, 20),
        ("orders", 1, 10),
    ] {
        for n in 0..count {
            let user = if n % 2 == 0 { "alice" } else { "bob" };
            events.push(event_at(service, user, days_ago(days, n as i64), n));
        }
    }
    events
}

/// Exports with `request`: the first chunk's (total, archived) and every line.
pub async fn export(
    query: &mut QueryServiceClient<Channel>,
    request: ExportRequest,
) -> (u64, u64, Vec<String>) {
    let mut chunks = query.export(request).await.expect("export").into_inner();
    let mut first = None;
    let mut lines = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.expect("chunk");
        first.get_or_insert((chunk.total_events, chunk.archived_events));
        lines.extend(
            String::from_utf8(chunk.ndjson)
                .expect("utf-8")
                .lines()
                .map(str::to_owned),
        );
    }
    let (total, archived) = first.expect("a first chunk");
    assert_eq!(total as usize, lines.len());
    (total, archived, lines)
}
