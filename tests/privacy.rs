//! Personal data against the real server and PostgreSQL: user ids are stored pseudonymized yet
//! found by their plain value, redacted keys never reach the database, encrypted values are
//! unreadable there and open only for scope `pii`, tampering fails closed, keys rotate, and a
//! changed or missing key file refuses to start.

mod common;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use common::{
    ServerSpec, TestDatabase, TestServer, channel_as, event, issue_certificate, publish,
    start_expecting_refusal,
};
use futures::StreamExt;
use serde_json::{Value as Json, json};
use sluice::proto::{
    DeleteRequest, Event, ExportRequest, QueryRequest, ingest_service_client::IngestServiceClient,
    query_service_client::QueryServiceClient,
};
use tonic::{Code, transport::Channel};

const SETTINGS: &str = r#"
[privacy]
pseudonymize_user_id = true
redact_metadata_keys = ["email", "phone"]
hash_metadata_keys = ["ip"]
encrypt_metadata_keys = ["ssn"]
"#;

const PRINCIPALS: &str = r#"
[auth]
default_scopes = []

[[auth.principals]]
name = "writer"
scopes = ["ingest"]

[[auth.principals]]
name = "reader"
scopes = ["query", "export", "delete"]

[[auth.principals]]
name = "officer"
scopes = ["query", "export", "pii"]

[[auth.principals]]
name = "ops"
scopes = ["admin"]
"#;

async fn start(database: &TestDatabase, toml: &str) -> TestServer {
    TestServer::start(ServerSpec::with_database(&database.url).toml(toml)).await
}

fn metadata(value: Json) -> sluice::proto::Metadata {
    value.as_object().cloned().expect("object").into()
}

fn personal(user: &str, ssn: &str) -> Event {
    Event {
        user_id: user.to_owned(),
        metadata: Some(metadata(json!({
            "Email": format!("{user}@example.com"),
            "contact": {"phone": "555-0100"},
            "ip": "10.1.2.3",
            "ssn": ssn,
            "nested": {"ssn": {"last4": 6789}},
            "plan": "pro"
        }))),
        ..event("accounts", "signed up")
    }
}

async fn query_user(
    client: &mut QueryServiceClient<Channel>,
    user: &str,
) -> Result<Vec<Event>, tonic::Status> {
    client
        .query(QueryRequest {
            user_id: user.to_owned(),
            ..Default::default()
        })
        .await
        .map(|response| response.into_inner().events)
}

fn metadata_json(event: &Event) -> Json {
    Json::Object(event.metadata.clone().expect("metadata").into_object())
}

async fn export_user(client: &mut QueryServiceClient<Channel>, user: &str) -> Vec<Json> {
    let mut chunks = client
        .export(ExportRequest {
            user_id: user.to_owned(),
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut lines = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.expect("chunk");
        for line in String::from_utf8(chunk.ndjson).expect("utf-8").lines() {
            lines.push(serde_json::from_str(line).expect("json line"));
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_is_protected_at_rest_found_by_plain_id_and_shown_only_to_pii() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start(&database, &format!("{SETTINGS}{PRINCIPALS}")).await;
    for name in ["writer", "reader", "officer", "ops"] {
        issue_certificate(&server, name);
    }
    let mut writer = IngestServiceClient::new(channel_as(&server, "writer").await);
    let response = publish(
        &mut writer,
        vec![
            personal("alice", "123-45-6789"),
            personal("bob", "987-65-4321"),
        ],
    )
    .await;
    assert_eq!(response.accepted, 2, "{response:?}");

    // In PostgreSQL: no plain user id, no redacted key, no plaintext of a hashed or
    // encrypted value.
    let mut connection = database.connect().await;
    let stored: Vec<(String, Json)> = sqlx::query_as::<_, (String, sqlx::types::Json<Json>)>(
        "SELECT user_id, metadata FROM events",
    )
    .fetch_all(&mut connection)
    .await
    .expect("rows")
    .into_iter()
    .map(|(user, metadata)| (user, metadata.0))
    .collect();
    assert_eq!(stored.len(), 2);
    for (user, metadata) in &stored {
        assert!(user.starts_with("h1:") && user.len() == 67, "{user}");
        let text = metadata.to_string();
        for plain in [
            "alice",
            "bob",
            "example.com",
            "555-0100",
            "10.1.2.3",
            "123-45",
            "987-65",
            "6789",
        ] {
            assert!(!text.contains(plain), "{plain} stored in {text}");
        }
        assert!(metadata.get("Email").is_none() && metadata["contact"].get("phone").is_none());
        assert!(
            metadata["ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("h1:"))
        );
        assert!(
            metadata["ssn"]
                .as_str()
                .is_some_and(|ssn| ssn.starts_with("enc:v1:k1:"))
        );
        assert!(
            metadata["nested"]["ssn"]
                .as_str()
                .is_some_and(|ssn| ssn.starts_with("enc:v1:k1:"))
        );
        assert_eq!(metadata["plan"], "pro");
    }

    // Callers keep using plain ids; without pii they see a marker, with pii the plaintext.
    let mut reader = QueryServiceClient::new(channel_as(&server, "reader").await);
    let mut officer = QueryServiceClient::new(channel_as(&server, "officer").await);
    let mut ops = QueryServiceClient::new(channel_as(&server, "ops").await);
    let hidden = query_user(&mut reader, "alice").await.expect("query");
    assert_eq!(hidden.len(), 1);
    assert_eq!(metadata_json(&hidden[0])["ssn"], "[encrypted]");
    let admin_view = query_user(&mut ops, "alice").await.expect("query");
    assert_eq!(
        metadata_json(&admin_view[0])["ssn"],
        "[encrypted]",
        "admin does not imply pii"
    );
    let shown = query_user(&mut officer, "alice").await.expect("query");
    assert_eq!(metadata_json(&shown[0])["ssn"], "123-45-6789");
    assert_eq!(
        metadata_json(&shown[0])["nested"]["ssn"],
        json!({"last4": 6789})
    );
    let exported = export_user(&mut reader, "alice").await;
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["metadata"]["ssn"], "[encrypted]");
    let exported = export_user(&mut officer, "alice").await;
    assert_eq!(exported[0]["metadata"]["ssn"], "123-45-6789");

    // A client value that mimics an encrypted one is refused, its neighbour stored.
    let mut mimic = event("accounts", "mimic");
    mimic.metadata = Some(metadata(json!({"note": "enc:v1:k1:AAAA:BBBB"})));
    let response = publish(&mut writer, vec![mimic, event("accounts", "fine")]).await;
    assert_eq!((response.accepted, response.rejected), (1, 1));
    assert_eq!(response.rejections[0].field, "metadata");

    // Moving a ciphertext to another event fails closed: an error, never someone's data.
    let users: Vec<String> = stored.iter().map(|(user, _)| user.clone()).collect();
    sqlx::query(
        "UPDATE events SET metadata = jsonb_set(metadata, '{ssn}', \
         (SELECT metadata->'ssn' FROM events WHERE user_id = $1)) WHERE user_id = $2",
    )
    .bind(&users[1])
    .bind(&users[0])
    .execute(&mut connection)
    .await
    .expect("tamper");
    let tampered_user = if query_user(&mut officer, "alice").await.is_err() {
        "alice"
    } else {
        "bob"
    };
    let refused = query_user(&mut officer, tampered_user)
        .await
        .expect_err("fails closed");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(!refused.message().contains("987-65") && !refused.message().contains("123-45"));
    let refused = query_user(&mut reader, tampered_user)
        .await
        .expect_err("fails closed for all");
    assert_eq!(refused.code(), Code::DataLoss);

    // Delete by the plain id reaches the pseudonymized rows.
    let deleted = reader
        .delete(DeleteRequest {
            user_id: tampered_user.to_owned(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    assert!(
        query_user(&mut officer, tampered_user)
            .await
            .expect("query")
            .is_empty()
    );
}

/// Appends a new encryption key to a key file.
fn add_key(path: &Path, id: &str) {
    let mut text = std::fs::read_to_string(path).expect("key file");
    let key: [u8; 32] = rand::random();
    text.push_str(&format!(
        "\n[[encryption_keys]]\nid = \"{id}\"\nkey = \"{}\"\n",
        STANDARD.encode(key)
    ));
    std::fs::write(path, text).expect("write key file");
}

async fn stored_key_ids(database: &TestDatabase) -> Vec<String> {
    let mut connection = database.connect().await;
    sqlx::query_scalar(
        "SELECT substring(metadata->>'ssn' from 8 for 2) FROM events ORDER BY message",
    )
    .fetch_all(&mut connection)
    .await
    .expect("key ids")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_encrypts_after_a_reload_old_values_still_open_and_rotate_reencrypts_them() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // No principals: the zero-config client has every scope, pii included.
    let server = start(&database, SETTINGS).await;
    let mut ingest = server.ingest_client().await;
    let old: Vec<Event> = (0..3)
        .map(|n| Event {
            message: format!("a old {n}"),
            ..personal("carol", &format!("old-{n}"))
        })
        .collect();
    publish(&mut ingest, old).await;
    let key_file = server.dir_path().join("data/privacy.keys");
    add_key(&key_file, "k2");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while database
        .scalar("SELECT count(*) FROM audit_log WHERE rpc = 'Reload' AND code = 'OK'")
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "no reload:\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(
        &mut ingest,
        vec![Event {
            message: "b new".to_owned(),
            ..personal("carol", "new")
        }],
    )
    .await;
    assert_eq!(stored_key_ids(&database).await, ["k1", "k1", "k1", "k2"]);
    let mut query = server.query_client().await;
    let ssns = |events: Vec<Event>| -> Vec<Json> {
        let mut ssns: Vec<Json> = events
            .iter()
            .map(|event| metadata_json(event)["ssn"].clone())
            .collect();
        ssns.sort_by_key(|ssn| ssn.to_string());
        ssns
    };
    let expected = vec![json!("new"), json!("old-0"), json!("old-1"), json!("old-2")];
    assert_eq!(
        ssns(query_user(&mut query, "carol").await.expect("query")),
        expected
    );

    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "privacy",
            "rotate",
            "--database-url",
            &database.url,
            "--config",
        ])
        .arg(server.dir_path().join("sluice.toml"))
        .env("SLUICE_DATA_DIR", server.dir_path().join("data"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("rotate");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Json = serde_json::from_slice(&output.stdout).expect("report");
    // Three events, two encrypted values each (ssn and nested.ssn).
    assert_eq!(report["values_reencrypted"], 6, "{report}");
    assert_eq!(report["rows_updated"], 3, "{report}");
    assert_eq!(stored_key_ids(&database).await, ["k2", "k2", "k2", "k2"]);
    assert_eq!(
        ssns(query_user(&mut query, "carol").await.expect("query")),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_or_missing_key_file_refuses_to_start_and_writes_no_new_key() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let mut server = start(&database, SETTINGS).await;
    let mut ingest = server.ingest_client().await;
    publish(&mut ingest, vec![personal("dave", "111-22-3333")]).await;
    server.terminate();
    assert!(server.wait(Duration::from_secs(30)).success());
    let dir = server.dir_path().to_owned();
    let key_file = dir.join("data/privacy.keys");
    let original = std::fs::read_to_string(&key_file).expect("key file");

    // Missing: the server would make a new key and strand the stored data. It refuses, and
    // leaves no new key file behind.
    std::fs::remove_file(&key_file).expect("remove");
    let stderr = start_expecting_refusal(&dir, &database.url, &[]);
    assert!(
        stderr.contains("privacy key file") && stderr.contains("differs"),
        "{stderr}"
    );
    assert!(!key_file.exists(), "a new key file was written");

    // Changed: another HMAC key.
    let other: [u8; 32] = rand::random();
    let changed: String = original
        .lines()
        .map(|line| {
            if line.starts_with("hmac_key") {
                format!("hmac_key = \"{}\"", STANDARD.encode(other))
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    write_private(&key_file, &changed);
    let stderr = start_expecting_refusal(&dir, &database.url, &[]);
    assert!(
        stderr.contains("HMAC key") && stderr.contains("differs"),
        "{stderr}"
    );
    for line in original.lines().chain(changed.lines()) {
        if let Some(key) = line
            .split('"')
            .nth(1)
            .filter(|_| line.contains("key =") || line.starts_with("hmac_key"))
        {
            assert!(!stderr.contains(key), "a key reached the log");
        }
    }

    // An encryption key dropped from the file.
    let dropped: String = original
        .split("\n[[encryption_keys]]")
        .next()
        .expect("head")
        .to_owned();
    write_private(&key_file, &dropped);
    let stderr = start_expecting_refusal(&dir, &database.url, &[]);
    assert!(stderr.contains("encryption key k1 is missing"), "{stderr}");

    // The original file: it starts again, and the data opens.
    write_private(&key_file, &original);
    let server = TestServer::start(ServerSpec {
        dir: Some(dir),
        ..ServerSpec::with_database(&database.url)
    })
    .await;
    let mut query = server.query_client().await;
    let events = query_user(&mut query, "dave").await.expect("query");
    assert_eq!(metadata_json(&events[0])["ssn"], "111-22-3333");
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opted_out_user_is_refused_at_ingest_until_opt_in_and_events_already_accepted_are_kept()
{
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start(&database, "").await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    let of = |user: &str, service: &str| Event {
        user_id: user.to_owned(),
        ..event(service, "tracked")
    };

    // Accepted before the opt-out, still in the buffer while the writers are held up: kept.
    let blocker = database.stall_writers().await;
    let mut early_client = ingest.clone();
    let early_event = of("erin", "web");
    let early = tokio::spawn(async move {
        early_client
            .publish(common::request(vec![early_event]))
            .await
            .expect("early publish")
            .into_inner()
    });
    // In the buffer, past the opt-out check (Stats reads the buffer live).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = query
            .stats(sluice::proto::StatsRequest::default())
            .await
            .expect("stats")
            .into_inner();
        if stats.buffer.is_some_and(|buffer| buffer.events >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the early event never reached the buffer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    query
        .opt_out(sluice::proto::OptOutRequest {
            user_id: "erin".to_owned(),
            services: vec![],
        })
        .await
        .expect("opt out");
    TestDatabase::resume_writers(blocker).await;
    assert_eq!(early.await.expect("early").accepted, 1);
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'erin'")
            .await,
        1
    );
    // The table holds the keyed hash, never the plain id.
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM privacy_optouts WHERE user_key LIKE 'h1:%' AND user_key <> 'erin'")
            .await,
        1
    );

    // From now on: refused with a reason, counted; others are stored.
    let response = publish(&mut ingest, vec![of("erin", "web"), of("frank", "web")]).await;
    assert_eq!(
        (response.accepted, response.rejected),
        (1, 1),
        "{response:?}"
    );
    assert_eq!(response.rejections[0].field, "user_id");
    assert_eq!(response.rejections[0].reason, "user opted out");
    assert_eq!(
        common::metric_sum(
            &server.metrics().await,
            "sluice_events_rejected_total",
            "reason=\"user_opted_out\""
        ),
        1.0
    );

    // An opt-out of some services only.
    query
        .opt_out(sluice::proto::OptOutRequest {
            user_id: "frank".to_owned(),
            services: vec!["ads".to_owned()],
        })
        .await
        .expect("opt out of ads");
    let response = publish(&mut ingest, vec![of("frank", "ads"), of("frank", "web")]).await;
    assert_eq!(
        (response.accepted, response.rejected),
        (1, 1),
        "{response:?}"
    );
    assert_eq!(response.rejections[0].index, 0);

    // OptIn: stored again.
    let opted_in = query
        .opt_in(sluice::proto::OptInRequest {
            user_id: "erin".to_owned(),
            services: vec![],
        })
        .await
        .expect("opt in")
        .into_inner();
    assert!(opted_in.was_opted_out);
    let response = publish(&mut ingest, vec![of("erin", "web")]).await;
    assert_eq!(response.accepted, 1);
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM audit_log WHERE rpc IN ('OptOut', 'OptIn')")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymize_breaks_the_link_in_the_table_dead_letters_and_archive_and_is_idempotent() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start(
        &database,
        &format!("{SETTINGS}\n[lifecycle]\nenabled = false\n"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let mut old = personal("gina", "555-11-2222");
    let ten_days_ago = chrono::Utc::now() - chrono::Duration::days(10);
    old.timestamp = Some(prost_types::Timestamp {
        seconds: ten_days_ago.timestamp(),
        nanos: 0,
    });
    let mut broken = personal("gina", "555-11-3333");
    broken.message = "a NUL \u{0} PostgreSQL refuses".to_owned();
    let response = publish(
        &mut ingest,
        vec![
            old,
            personal("gina", "555-11-4444"),
            broken,
            personal("hank", "000"),
        ],
    )
    .await;
    // The NUL event is refused by PostgreSQL and kept in dead_letters.
    assert_eq!(
        (response.accepted, response.rejected),
        (3, 1),
        "{response:?}"
    );
    let report = common::lifecycle_once(&server, &database.url, &[]);
    assert_eq!(report["rows_archived"], 1, "{report}");
    assert_eq!(
        database.scalar("SELECT count(*) FROM dead_letters").await,
        1
    );

    let mut query = server.query_client().await;
    let anonymize = |dry_run| sluice::proto::AnonymizeRequest {
        user_id: "gina".to_owned(),
        dry_run,
    };
    let dry = query
        .anonymize(anonymize(true))
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(
        (
            dry.anonymized,
            dry.dead_letters_anonymized,
            dry.archived_anonymized
        ),
        (1, 1, 1),
        "{dry:?}"
    );
    let done = query
        .anonymize(anonymize(false))
        .await
        .expect("anonymize")
        .into_inner();
    assert_eq!(
        (
            done.anonymized,
            done.dead_letters_anonymized,
            done.archived_anonymized
        ),
        (1, 1, 1),
        "{done:?}"
    );

    // Nothing links to gina any more; her events remain, under one pseudonym, without the
    // encrypted or hashed keys.
    assert!(
        query_user(&mut query, "gina")
            .await
            .expect("query")
            .is_empty()
    );
    let mut connection = database.connect().await;
    let rows: Vec<(String, sqlx::types::Json<Json>)> =
        sqlx::query_as("SELECT user_id, metadata FROM events WHERE user_id LIKE 'anon:%'")
            .fetch_all(&mut connection)
            .await
            .expect("rows");
    assert_eq!(rows.len(), 1);
    let pseudonym = rows[0].0.clone();
    let text = rows[0].1.0.to_string();
    assert!(!text.contains("enc:v1:") && !text.contains("h1:"), "{text}");
    assert_eq!(rows[0].1.0["plan"], "pro");
    let (letter_user, raw): (String, Vec<u8>) =
        sqlx::query_as("SELECT user_id, raw FROM dead_letters")
            .fetch_one(&mut connection)
            .await
            .expect("dead letter");
    assert_eq!(letter_user, pseudonym);
    let raw = String::from_utf8(raw).expect("utf-8");
    assert!(!raw.contains("enc:v1:") && !raw.contains("h1:"), "{raw}");
    let (path,): (String,) = sqlx::query_as("SELECT path FROM archives")
        .fetch_one(&mut connection)
        .await
        .expect("archive");
    let object = std::fs::read(server.dir_path().join("data/archive").join(&path)).expect("object");
    let line = String::from_utf8(zstd::decode_all(&object[..]).expect("zstd")).expect("utf-8");
    assert!(
        line.contains(&pseudonym) && !line.contains("enc:v1:") && !line.contains("h1:"),
        "{line}"
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM archive_users WHERE user_id LIKE 'h1:%'")
            .await,
        0
    );

    // Idempotent: nothing is left to anonymize; hank was never touched.
    let again = query
        .anonymize(anonymize(false))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(
        (
            again.anonymized,
            again.dead_letters_anonymized,
            again.archived_anonymized
        ),
        (0, 0, 0)
    );
    assert_eq!(
        query_user(&mut query, "hank").await.expect("query").len(),
        1
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM audit_log WHERE rpc = 'Anonymize' AND code = 'OK'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numeric_user_id_in_metadata_is_the_user_for_queries_opt_out_and_delete() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start(&database, "[privacy]\npseudonymize_user_id = true\n").await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    let numbered = |message: &str| Event {
        metadata: Some(metadata(json!({ "userId": 12345, "plan": "pro" }))),
        ..event("accounts", message)
    };
    publish(&mut ingest, vec![numbered("first")]).await;
    // Stored under the pseudonym of "12345", in the column and in the metadata alike.
    let found = query_user(&mut query, "12345").await.expect("query");
    assert_eq!(found.len(), 1);
    assert_eq!(
        metadata_json(&found[0])["userId"],
        json!(found[0].user_id),
        "one pseudonym for the column and the metadata"
    );
    assert!(
        found[0].user_id.starts_with("h1:"),
        "{:?}",
        found[0].user_id
    );

    // Opted out as "12345": the numeric form is refused as the string form is.
    query
        .opt_out(sluice::proto::OptOutRequest {
            user_id: "12345".to_owned(),
            services: vec![],
        })
        .await
        .expect("opt out");
    let refused = publish(
        &mut ingest,
        vec![
            numbered("second"),
            Event {
                user_id: "12345".to_owned(),
                ..event("accounts", "third")
            },
        ],
    )
    .await;
    assert_eq!((refused.accepted, refused.rejected), (0, 2), "{refused:?}");
    query
        .opt_in(sluice::proto::OptInRequest {
            user_id: "12345".to_owned(),
            services: vec![],
        })
        .await
        .expect("opt in");

    // Deleted as "12345".
    let deleted = query
        .delete(DeleteRequest {
            user_id: "12345".to_owned(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    assert!(
        query_user(&mut query, "12345")
            .await
            .expect("query")
            .is_empty()
    );
}
