//! Backups of the private cluster: WAL archiving and base backups into a real `file://`
//! repository, `sluice backup --verify`, and a point-in-time restore after the cluster is
//! destroyed, with the real server, PostgreSQL, pg_basebackup and WAL replay.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{ServerSpec, TestServer, event, metric_sum, publish, wait_for_status};
use sluice::proto::{DeleteRequest, Event};
use sluice::store::EmbeddedPostgres;
use sqlx::Connection;
use tonic_health::pb::health_check_response::ServingStatus;

/// Runs a `sluice` subcommand with the backup settings; returns its JSON report.
fn sluice(
    args: &[&str],
    data_dir: &Path,
    url: &str,
    env: &[(String, String)],
) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("SLUICE_DATA_DIR", data_dir)
        .env("SLUICE_BACKUP__URL", url)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(key, value)| (key, value)))
        .output()
        .expect("run sluice");
    assert!(
        output.status.success(),
        "sluice {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json report")
}

/// Publishes `count` events of `service` (acknowledged means committed).
async fn ingest(server: &TestServer, service: &str, count: usize) {
    let mut client = server.ingest_client().await;
    let events = (0..count)
        .map(|index| event(service, &format!("{service} {index}")))
        .collect();
    assert_eq!(publish(&mut client, events).await.accepted, count as u64);
}

async fn count_by_service(url: &str) -> Vec<(String, i64)> {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_as("SELECT service, count(*) FROM events GROUP BY service ORDER BY service")
        .fetch_all(&mut connection)
        .await
        .expect("count")
}

/// Switches to a new WAL segment and waits until the archiver sent the last one to the
/// repository (`archive_timeout` does it in production).
async fn archive_wal_now(connection: &mut sqlx::PgConnection) {
    let switched: String = sqlx::query_scalar("SELECT pg_walfile_name(pg_switch_wal())")
        .fetch_one(&mut *connection)
        .await
        .expect("switch wal");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let archived: Option<String> =
            sqlx::query_scalar("SELECT last_archived_wal FROM pg_stat_archiver")
                .fetch_one(&mut *connection)
                .await
                .expect("archiver");
        if archived.as_deref() >= Some(switched.as_str()) {
            return;
        }
        assert!(Instant::now() < deadline, "{switched} never archived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `file://` repository that the user PostgreSQL runs as can write to (its archive_command
/// writes there).
fn file_repository() -> (tempfile::TempDir, String) {
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let url = format!("file://{}", base.path().join("repository").display());
    (base, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_a_point_in_time_brings_back_exactly_what_was_committed_before_it() {
    let (_base, url) = file_repository();
    point_in_time_restore(&url, Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_kept_off_the_machine_in_s3_restore_to_a_point_in_time() {
    let s3 = common::S3::from_env();
    let url = format!(
        "s3://{}/backups-{}",
        s3.bucket,
        uuid::Uuid::new_v4().simple()
    );
    point_in_time_restore(&url, s3.env()).await;
}

/// A, a base backup, B, the target time T, C; the cluster destroyed; a restore to T holds
/// exactly A and B. `env` reaches the server (and so the cluster's archive_command) and the
/// commands.
async fn point_in_time_restore(url: &str, env: Vec<(String, String)>) {
    common::init_crypto();
    let url = url.to_owned();
    let mut spec = ServerSpec::default()
        .env("SLUICE_BACKUP__URL", &url)
        .env("SLUICE_BACKUP__MAX_RPO", "10m");
    spec.env.extend(env.iter().cloned());
    let server = TestServer::start(spec.clone()).await;
    wait_for_status(&server, ServingStatus::Serving).await;
    let data_dir = server.dir_path().join("data");
    let cluster = EmbeddedPostgres::start(&data_dir).expect("attach to the private cluster");
    let cluster_url = cluster.url();
    let mut connection = sqlx::PgConnection::connect(&cluster_url)
        .await
        .expect("connect");
    let (archive_mode, archive_timeout): (String, String) = sqlx::query_as(
        "SELECT current_setting('archive_mode'), current_setting('archive_timeout')",
    )
    .fetch_one(&mut connection)
    .await
    .expect("settings");
    assert_eq!(archive_mode, "on");
    assert_eq!(archive_timeout, "5min", "half of backup.max_rpo");

    // A, a base backup, B, the target time, C.
    ingest(&server, "a", 100).await;
    let taken = sluice(&["backup", "--once"], &data_dir, &url, &env);
    let backup_id = taken["backup"]["id"]
        .as_str()
        .expect("backup id")
        .to_owned();
    assert_eq!(taken["backup"]["files"].as_array().map(Vec::len), Some(3));
    ingest(&server, "b", 100).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ingest(&server, "c", 100).await;
    // C's WAL leaves the machine (archive_timeout does it in production).
    archive_wal_now(&mut connection).await;
    drop(connection);

    // The newest backup restores, its checksums hold, and it holds A.
    let verified = sluice(&["backup", "--verify"], &data_dir, &url, &env);
    println!("verify: {verified}");
    assert_eq!(verified["backup"], backup_id.as_str());
    assert_eq!(verified["events"], 100);
    assert!(verified["checked_bytes"].as_u64() > Some(0));
    let metrics = server.metrics().await;
    assert!(
        metric_sum(&metrics, "sluice_backups_total", "outcome=\"ok\"") >= 1.0,
        "the server took its first backup on its own:\n{metrics}\n{}\n{}",
        server.logs(),
        std::fs::read_to_string(cluster.data_dir().join("postgres.log")).unwrap_or_default()
    );

    // The machine is lost: the server stops and the cluster is destroyed.
    server.terminate();
    let mut server = server;
    assert!(server.wait(Duration::from_secs(60)).success());
    let cluster_dir = cluster.data_dir().to_owned();
    drop(cluster);
    std::fs::remove_dir_all(&cluster_dir).expect("destroy the cluster");

    let target_text = target.to_rfc3339();
    let data_dir_text = data_dir.display().to_string();
    let restored = sluice(
        &[
            "restore",
            "--to",
            &target_text,
            "--data-dir",
            &data_dir_text,
        ],
        &data_dir,
        &url,
        &env,
    );
    println!("restore: {restored}");
    if let Some(directory) = url.strip_prefix("file://") {
        // The new timeline is published, so that a later restore knows of it.
        assert!(
            Path::new(directory)
                .join("wal/00000002.history.zst")
                .exists(),
            "the history file of the restored timeline is archived"
        );
    }
    assert_eq!(restored["backup"], backup_id.as_str());
    assert_eq!(restored["events"], 200, "A and B: {restored}");

    // sluice starts on the restored cluster: exactly A and B, and ingest works.
    let again = TestServer::start(ServerSpec {
        dir: Some(server.dir_path().to_owned()),
        ..spec
    })
    .await;
    wait_for_status(&again, ServingStatus::Serving).await;
    assert_eq!(
        count_by_service(&cluster_url).await,
        [("a".to_owned(), 100), ("b".to_owned(), 100)]
    );
    ingest(&again, "d", 10).await;
}

/// Publishes `count` events of `user` (service `a`).
async fn ingest_user(server: &TestServer, user: &str, count: usize) {
    let mut client = server.ingest_client().await;
    let events = (0..count)
        .map(|index| Event {
            user_id: user.to_owned(),
            ..event("a", &format!("{user} {index}"))
        })
        .collect();
    assert_eq!(publish(&mut client, events).await.accepted, count as u64);
}

async fn delete_user(server: &TestServer, user: &str) -> u64 {
    server
        .query_client()
        .await
        .delete(DeleteRequest {
            user_id: user.to_owned(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner()
        .deleted
}

async fn count_by_user(url: &str) -> Vec<(String, i64)> {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_as(
        "SELECT user_id, count(*) FROM events WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY user_id",
    )
    .fetch_all(&mut connection)
    .await
    .expect("count")
}

/// The Deletes made after the restored time are in the backup repository's journal, not in
/// the restored database: the restored server applies them again before it serves. One made
/// before it, applied again, leaves the user's events sent after it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_before_a_delete_applies_it_again_before_serving() {
    common::init_crypto();
    let (_base, url) = file_repository();
    let spec = ServerSpec::default()
        .env("SLUICE_BACKUP__URL", &url)
        .env("SLUICE_BACKUP__MAX_RPO", "10m");
    let server = TestServer::start(spec.clone()).await;
    wait_for_status(&server, ServingStatus::Serving).await;
    let data_dir = server.dir_path().join("data");
    let cluster = EmbeddedPostgres::start(&data_dir).expect("attach to the private cluster");
    let cluster_url = cluster.url();

    ingest_user(&server, "early", 5).await;
    ingest_user(&server, "late", 5).await;
    sluice(&["backup", "--once"], &data_dir, &url, &[]);
    assert_eq!(delete_user(&server, "early").await, 5);
    // Past the margin for the nodes' clocks: "early" comes back, and stays.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ingest_user(&server, "early", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(delete_user(&server, "late").await, 5);
    let mut connection = sqlx::PgConnection::connect(&cluster_url)
        .await
        .expect("connect");
    archive_wal_now(&mut connection).await;
    drop(connection);

    server.terminate();
    let mut server = server;
    assert!(server.wait(Duration::from_secs(60)).success());
    let cluster_dir = cluster.data_dir().to_owned();
    drop(cluster);
    std::fs::remove_dir_all(&cluster_dir).expect("destroy the cluster");
    let target_text = target.to_rfc3339();
    let data_dir_text = data_dir.display().to_string();
    let restored = sluice(
        &[
            "restore",
            "--to",
            &target_text,
            "--data-dir",
            &data_dir_text,
        ],
        &data_dir,
        &url,
        &[],
    );
    println!("restore: {restored}");
    assert_eq!(restored["erasures_to_reapply"], 2, "{restored}");
    let pending = data_dir.join("erasures-to-reapply.json");
    assert!(pending.exists());

    let again = TestServer::start(ServerSpec {
        dir: Some(server.dir_path().to_owned()),
        ..spec
    })
    .await;
    wait_for_status(&again, ServingStatus::Serving).await;
    assert_eq!(
        count_by_user(&cluster_url).await,
        [("early".to_owned(), 1)],
        "the Delete after the restored time is applied again; the events sent after the \
         one before it stay:\n{}",
        again.logs()
    );
    assert!(!pending.exists(), "applied once, forgotten");
    let mut connection = sqlx::PgConnection::connect(&cluster_url)
        .await
        .expect("connect");
    let reapplied: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT rpc, details FROM audit_log WHERE principal = '(restore)' ORDER BY id",
    )
    .fetch_all(&mut connection)
    .await
    .expect("audit");
    assert_eq!(reapplied.len(), 2, "{reapplied:?}");
    assert!(reapplied.iter().all(|(rpc, _)| rpc == "Delete"));
    assert_eq!(reapplied[1].1["rows"], 5, "{reapplied:?}");
    assert_eq!(reapplied[0].1["rows"], 0, "{reapplied:?}");
    drop(connection);

    // To bring back what a mistaken Delete removed, the operator says so.
    again.terminate();
    let mut again = again;
    assert!(again.wait(Duration::from_secs(60)).success());
    std::fs::remove_dir_all(&cluster_dir).expect("destroy the cluster");
    let undone = sluice(
        &[
            "restore",
            "--to",
            &target_text,
            "--data-dir",
            &data_dir_text,
            "--undo-erasures",
        ],
        &data_dir,
        &url,
        &[],
    );
    assert_eq!(undone["erasures_undone"], 2, "{undone}");
    assert_eq!(undone["erasures_to_reapply"], 0, "{undone}");
    assert!(!pending.exists());
    let undone_server = TestServer::start(ServerSpec {
        dir: Some(server.dir_path().to_owned()),
        ..ServerSpec::default()
            .env("SLUICE_BACKUP__URL", &url)
            .env("SLUICE_BACKUP__MAX_RPO", "10m")
    })
    .await;
    wait_for_status(&undone_server, ServingStatus::Serving).await;
    assert_eq!(
        count_by_user(&cluster_url).await,
        [("early".to_owned(), 1), ("late".to_owned(), 5)]
    );
}
