//! The archive against the real server, PostgreSQL, a real file store and a real S3 server
//! (moto, started by `scripts/test`): events past `archive.after` move into zstd NDJSON
//! objects byte-equal to what Export gave, Export and Delete reach them, Restore brings them
//! back idempotently, and neither a failing store nor `kill -9` loses or duplicates an event.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::{
    TestDatabase,
    archived::{Archived, Store, days_ago, event_at, export, fixture, line_id, number_n},
    publish,
};
use futures::StreamExt;
use sluice::proto::{
    DeleteRequest, Event, ExportRequest, QueryRequest, RestoreRequest,
    query_service_client::QueryServiceClient,
};
use tonic::transport::Channel;

fn user_of(line: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(line).expect("json line");
    json["user_id"].as_str().unwrap_or_default().to_owned()
}

fn by_id(lines: Vec<String>) -> BTreeMap<String, String> {
    lines
        .into_iter()
        .map(|line| (line_id(&line), line))
        .collect()
}

/// The whole story on one store: archive, byte-check, Export, Delete, Restore.
async fn archive_round_trip(store: Store) {
    let archived = Archived::start(store, "").await;
    let mut ingest = archived.server.ingest_client().await;
    let events = fixture();
    let response = publish(&mut ingest, events.clone()).await;
    assert_eq!(response.accepted as usize, events.len(), "{response:?}");
    let mut query = archived.query_client().await;
    let (_, none_archived, before) = export(&mut query, ExportRequest::default()).await;
    assert_eq!(none_archived, 0);
    let before = by_id(before);

    // One object per service per day, for everything older than 7 days.
    let report = archived.lifecycle();
    assert_eq!(report["rows_archived"], 90, "{report}");
    assert_eq!(report["objects_written"], 3, "{report}");
    assert_eq!(archived.hot_rows("TRUE").await, 10);
    let catalog = archived.catalog().await;
    let paths: Vec<&str> = catalog.iter().map(|(path, _, _)| path.as_str()).collect();
    let day = |days: i64| days_ago(days, 0).format("%Y-%m-%d").to_string();
    assert_eq!(
        paths,
        [
            format!("service=orders/date={}/part-1.ndjson.zst", day(10)),
            format!("service=orders/date={}/part-1.ndjson.zst", day(9)),
            format!("service=payments/date={}/part-1.ndjson.zst", day(12)),
        ]
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
    );
    assert_eq!(
        archived.stored_paths().await,
        paths,
        "only recorded objects are stored"
    );
    // Byte for byte what Export gave before, each object checked against its sha256.
    let lines = archived.archived_lines().await;
    assert_eq!(lines.len(), 90);
    for (id, line) in &lines {
        assert_eq!(Some(line), before.get(id), "archived line of {id}");
    }
    // A client resending an archived event: stored again in the table, then recognized by the
    // next run and not archived twice.
    let resent = publish(&mut ingest, vec![events[0].clone()]).await;
    assert_eq!(resent.accepted, 1);
    let report = archived.lifecycle();
    assert_eq!(
        (
            report["rows_archived"].as_u64(),
            report["rows_already_archived"].as_u64()
        ),
        (Some(0), Some(1)),
        "{report}"
    );
    assert_eq!(
        archived.archived_lines().await.len(),
        90,
        "no event archived twice"
    );
    assert_eq!(archived.hot_rows("TRUE").await, 10);

    // Export spans PostgreSQL and the archive, byte-equal, saying how much was archived.
    let (total, from_archive, after) = export(&mut query, ExportRequest::default()).await;
    assert_eq!((total, from_archive), (100, 90));
    assert_eq!(by_id(after), before);
    let (total, from_archive, alice) = export(
        &mut query,
        ExportRequest {
            user_id: "alice".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((total, from_archive), (50, 45));
    assert!(alice.iter().all(|line| user_of(line) == "alice"));
    // Content filters run on archived lines as PostgreSQL runs them on rows.
    let (total, from_archive, _) = export(
        &mut query,
        ExportRequest {
            services: vec!["orders".to_owned()],
            message_contains: "event 3 ".to_owned(),
            metadata_contains: Some(number_n(3.0)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((total, from_archive), (3, 2), "event 3 of each orders day");

    // Delete by user reaches the archive: a dry run counts, then the objects are rewritten.
    let delete = |dry_run| DeleteRequest {
        user_id: "alice".to_owned(),
        dry_run,
        ..Default::default()
    };
    let dry = query
        .delete(delete(true))
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!((dry.deleted, dry.archived_deleted), (5, 45), "{dry:?}");
    assert_eq!(
        archived.archived_lines().await.len(),
        90,
        "a dry run deletes nothing"
    );
    let done = query
        .delete(delete(false))
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(
        (
            done.deleted,
            done.archived_deleted,
            done.archive_objects_rewritten
        ),
        (5, 45, 3),
        "{done:?}"
    );
    let lines = archived.archived_lines().await;
    assert_eq!(lines.len(), 45);
    assert!(lines.values().all(|line| user_of(line) != "alice"));
    for (id, line) in &lines {
        assert_eq!(Some(line), before.get(id), "rewritten line of {id}");
    }
    // The replaced objects are gone from the store; their replacements are the next parts.
    let catalog = archived.catalog().await;
    let paths: Vec<String> = catalog.iter().map(|(path, _, _)| path.clone()).collect();
    assert!(
        paths.iter().all(|path| path.ends_with("part-2.ndjson.zst")),
        "{paths:?}"
    );
    assert_eq!(archived.stored_paths().await, paths);
    assert_eq!(
        archived
            .database
            .scalar("SELECT count(*) FROM archive_garbage")
            .await,
        0
    );
    assert_eq!(
        archived
            .database
            .scalar("SELECT count(*) FROM archive_users WHERE user_id = 'alice'")
            .await,
        0
    );

    // Restore brings a range back into PostgreSQL, where Query sees it, and says how far it got.
    let restore = RestoreRequest {
        services: vec!["orders".to_owned()],
        start_time: Some(prost_types::Timestamp {
            seconds: days_ago(10, -3600).timestamp(),
            nanos: 0,
        }),
        end_time: Some(prost_types::Timestamp {
            seconds: days_ago(10, 3600).timestamp(),
            nanos: 0,
        }),
    };
    let progress = restore_all(&mut query, restore.clone()).await;
    let last = progress.last().expect("a final message");
    assert!(last.last);
    assert_eq!(
        (last.events_restored, last.events_already_present),
        (20, 0),
        "{progress:?}"
    );
    assert!(last.hold_until.is_some());
    let page = query
        .query(QueryRequest {
            services: vec!["orders".to_owned()],
            start_time: restore.start_time,
            end_time: restore.end_time,
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    assert_eq!(page.events.len(), 20);
    // Idempotent: nothing is left to restore, and nothing is duplicated.
    let again = restore_all(&mut query, restore).await;
    assert_eq!(again.last().map(|last| last.events_restored), Some(0));
    assert_eq!(archived.hot_rows("TRUE").await, 25);
    // The hold keeps the restored range out of the next run.
    let report = archived.lifecycle();
    assert_eq!(report["rows_archived"], 0, "{report}");
    let lines = archived.archived_lines().await;
    assert_eq!(lines.len(), 25);
    let hot: HashSet<String> = {
        let mut connection = archived.database.connect().await;
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM events")
            .fetch_all(&mut connection)
            .await
            .expect("ids")
            .into_iter()
            .map(|id| id.to_string())
            .collect()
    };
    assert!(
        lines.keys().all(|id| !hot.contains(id)),
        "an event in both places"
    );
    let (total, from_archive, _) = export(&mut query, ExportRequest::default()).await;
    assert_eq!((total, from_archive), (50, 25));
}

async fn restore_all(
    query: &mut QueryServiceClient<Channel>,
    request: RestoreRequest,
) -> Vec<sluice::proto::RestoreProgress> {
    let mut stream = query.restore(request).await.expect("restore").into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        messages.push(message.expect("progress"));
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_on_local_files_is_byte_exact_and_export_delete_restore_reach_it() {
    archive_round_trip(Store::Files).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_on_s3_is_byte_exact_and_export_delete_restore_reach_it() {
    archive_round_trip(Store::S3 {
        prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failing_midrun_leaves_the_hot_rows_and_the_next_run_finishes() {
    let archived = Archived::start(Store::Files, "").await;
    let mut ingest = archived.server.ingest_client().await;
    publish(&mut ingest, fixture()).await;
    // A file where the orders directory must go: every write under it fails.
    let archive_dir = archived.server.dir_path().join("data/archive");
    std::fs::write(archive_dir.join("service=orders"), b"in the way").expect("block");
    let output = common::lifecycle_run(&archived.server, &archived.database.url, &archived.env);
    assert!(!output.status.success(), "the run must fail");
    assert_eq!(
        archived
            .database
            .scalar(
                "SELECT count(*) FROM lifecycle_runs WHERE status = 'failed' AND error IS NOT NULL"
            )
            .await,
        1
    );
    assert_eq!(
        archived.hot_rows("service = 'orders'").await,
        80,
        "orders stay hot"
    );
    std::fs::remove_file(archive_dir.join("service=orders")).expect("unblock");
    let report = archived.lifecycle();
    assert_eq!(report["ran"], true, "{report}");
    assert_eq!(archived.hot_rows("TRUE").await, 10);
    assert_eq!(archived.archived_lines().await.len(), 90);
    let recorded: Vec<String> = archived
        .catalog()
        .await
        .into_iter()
        .map(|(path, _, _)| path)
        .collect();
    assert_eq!(
        archived.stored_paths().await,
        recorded,
        "no leftover object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_url_that_cannot_be_written_fails_at_start_naming_the_key() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a-file"), b"").expect("file");
    let run = |toml: String| {
        std::fs::write(dir.path().join("sluice.toml"), toml).expect("toml");
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "lifecycle",
                "--once",
                "--database-url",
                &database.url,
                "--config",
            ])
            .arg(dir.path().join("sluice.toml"))
            .env("SLUICE_DATA_DIR", dir.path().join("data"))
            .output()
            .expect("run")
    };
    let unwritable = run(format!(
        "[archive]\nurl = \"file://{}/under\"\n",
        dir.path().join("a-file").display()
    ));
    let stderr = String::from_utf8_lossy(&unwritable.stderr);
    assert!(!unwritable.status.success());
    assert!(stderr.contains("archive.url"), "{stderr}");
    for (toml, key) in [
        ("[archive]\nafter = \"a week\"\n", "archive.after"),
        ("[archive]\nafter = \"0s\"\n", "archive.after"),
        ("[archive]\nurl = \"ftp://host/x\"\n", "archive.url"),
    ] {
        let output = run(toml.to_owned());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{toml}");
        assert!(stderr.contains(key), "{toml}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifecycle_run_killed_midway_loses_and_duplicates_nothing() {
    let archived = Archived::start(Store::Files, "").await;
    let mut connection = archived.database.connect().await;
    const DAYS: i64 = 20;
    const PER_DAY: i64 = 5_000;
    sqlx::query(
        "INSERT INTO events (id, service, message, ts, user_id, metadata) \
         SELECT gen_random_uuid(), 'orders', 'old ' || i, \
         date_trunc('day', now() - (8 + i % $1) * interval '1 day') + interval '1 hour' + i * interval '1 ms', \
         'user-' || (i % 7), jsonb_build_object('i', i) \
         FROM generate_series(1, $1 * $2) i",
    )
    .bind(DAYS)
    .bind(PER_DAY)
    .execute(&mut connection)
    .await
    .expect("seed");
    let total = DAYS * PER_DAY;
    // The run's second object waits on a lock the test holds: the kill lands midway however
    // fast the machine archives.
    let mut holder = archived.database.connect().await;
    for statement in [
        "SELECT pg_advisory_lock(4242)",
        "CREATE FUNCTION test_hold_second_object() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM archives) THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF; \
         RETURN NEW; END $$",
        "CREATE TRIGGER test_hold_second_object BEFORE INSERT ON archives \
         FOR EACH ROW EXECUTE FUNCTION test_hold_second_object()",
    ] {
        sqlx::query(statement)
            .execute(&mut holder)
            .await
            .expect("hold the second object");
    }

    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "lifecycle",
            "--once",
            "--database-url",
            &archived.database.url,
            "--config",
        ])
        .arg(archived.server.dir_path().join("sluice.toml"))
        .env("SLUICE_DATA_DIR", archived.server.dir_path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start sluice lifecycle");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while archived
        .database
        .scalar("SELECT count(*) FROM archives")
        .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "nothing was archived");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    run.kill().expect("SIGKILL");
    run.wait().expect("reap");
    for statement in [
        "SELECT pg_advisory_unlock(4242)",
        "DROP TRIGGER test_hold_second_object ON archives",
        "DROP FUNCTION test_hold_second_object()",
    ] {
        sqlx::query(statement)
            .execute(&mut holder)
            .await
            .expect("release the second object");
    }
    let recorded = archived
        .database
        .scalar("SELECT count(*) FROM archives")
        .await;
    assert!(
        recorded < DAYS,
        "killed midway: {recorded} of {DAYS} days archived"
    );
    // Nothing lost so far: every event is a row or a recorded line.
    assert_eq!(
        archived.hot_rows("TRUE").await
            + archived
                .database
                .scalar("SELECT COALESCE(sum(rows), 0)::bigint FROM archives")
                .await,
        total
    );

    // The next run (once PostgreSQL has let go of the dead session) finishes the job.
    loop {
        let report = archived.lifecycle();
        if report["ran"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was never released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(archived.hot_rows("TRUE").await, 0);
    let lines = archived.archived_lines().await;
    assert_eq!(
        lines.len() as i64,
        total,
        "every event archived exactly once"
    );
    let recorded: Vec<String> = archived
        .catalog()
        .await
        .into_iter()
        .map(|(path, _, _)| path)
        .collect();
    assert_eq!(recorded.len() as i64, DAYS);
    assert_eq!(
        archived.stored_paths().await,
        recorded,
        "the dead run's object was collected"
    );
    assert_eq!(
        archived
            .database
            .scalar("SELECT count(*) FROM archive_garbage")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_share_an_id_but_not_a_timestamp_are_both_archived_and_kept() {
    let archived = Archived::start(Store::Files, "").await;
    let mut ingest = archived.server.ingest_client().await;
    let mut query = archived.server.query_client().await;
    let first = event_at("orders", "dana", days_ago(10, 0), 1);
    publish(&mut ingest, vec![first.clone()]).await;
    let report = archived.lifecycle();
    assert_eq!(report["rows_archived"].as_u64(), Some(1), "{report}");
    // The same id, another timestamp of the same day: another event (the key is (id, ts)).
    let second = Event {
        timestamp: Some(prost_types::Timestamp {
            seconds: days_ago(10, 60).timestamp(),
            nanos: 0,
        }),
        message: "same id, a minute later".to_owned(),
        ..first.clone()
    };
    assert_eq!(publish(&mut ingest, vec![second]).await.accepted, 1);
    let report = archived.lifecycle();
    assert_eq!(
        (
            report["rows_archived"].as_u64(),
            report["rows_already_archived"].as_u64()
        ),
        (Some(1), Some(0)),
        "{report}"
    );
    let (total, from_archive, lines) = export(
        &mut query,
        ExportRequest {
            user_id: "dana".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((total, from_archive, lines.len()), (2, 2, 2), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_ends_at_the_next_object_once_a_reload_takes_its_scope_away() {
    // The dev client certificate is an admin principal, for as long as the policy says so.
    let admin = "\n[[auth.principals]]\nname = \"client\"\nscopes = [\"admin\"]\n";
    let archived = Archived::start(Store::Files, admin).await;
    let mut ingest = archived.server.ingest_client().await;
    publish(&mut ingest, fixture()).await;
    let report = archived.lifecycle();
    assert_eq!(report["objects_written"], 3, "{report}");
    // The archive lock held: the restore waits at its first object while the policy changes.
    let mut holder = archived.database.connect().await;
    sqlx::query("SELECT pg_advisory_lock(hashtext('sluice.archive'))")
        .execute(&mut holder)
        .await
        .expect("lock");
    let mut query = archived.query_client().await;
    let mut progress = query
        .restore(RestoreRequest {
            services: Vec::new(),
            start_time: Some(prost_types::Timestamp {
                seconds: days_ago(20, 0).timestamp(),
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: days_ago(8, 0).timestamp(),
                nanos: 0,
            }),
        })
        .await
        .expect("restore")
        .into_inner();
    let toml = archived.server.dir_path().join("sluice.toml");
    let demoted = std::fs::read_to_string(&toml)
        .expect("sluice.toml")
        .replace("scopes = [\"admin\"]", "scopes = [\"query\"]");
    std::fs::write(&toml, demoted).expect("rewrite");
    let pid = nix::unistd::Pid::from_raw(archived.server.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !archived.server.logs().contains("auth policy reloaded") {
        assert!(std::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    sqlx::query("SELECT pg_advisory_unlock(hashtext('sluice.archive'))")
        .execute(&mut holder)
        .await
        .expect("unlock");
    let ended = loop {
        match progress.next().await {
            Some(Ok(step)) => assert!(!step.last, "the restore went to its end: {step:?}"),
            Some(Err(status)) => break status,
            None => panic!("the stream ended without a status"),
        }
    };
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    assert!(
        archived.hot_rows("TRUE").await < 100,
        "stopped before every object was back"
    );
}
