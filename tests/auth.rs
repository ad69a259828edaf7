//! Who may do what, against the real server: principals from certificates made with
//! `sluice certs` and from JWTs signed with RSA and EC keys made here, scopes, per-service
//! permissions, rate limits, SIGHUP reloads and the append-only audit log.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{
    ServerSpec, TestDatabase, TestServer, channel_as, event, issue_certificate, metric_sum, request,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, jwk::Jwk};
use sluice::proto::{
    AuditRequest, DeleteRequest, IngestRequest, QueryRequest, StatsRequest,
    ingest_service_client::IngestServiceClient, query_service_client::QueryServiceClient,
};
use tonic::{Code, Request};
use tonic_types::StatusExt;

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

const POLICY: &str = r#"
[auth]
default_scopes = []

[[auth.principals]]
name = "billing"
scopes = ["ingest"]
services = ["billing", "billing-*"]

[[auth.principals]]
name = "reader"
scopes = ["query", "export"]
services = ["billing*"]

[[auth.principals]]
name = "ops"
scopes = ["admin"]
"#;

/// Starts a server whose `sluice.toml` is `toml`, with certificates for `names`.
async fn start_with_policy(database: &TestDatabase, toml: &str, names: &[&str]) -> TestServer {
    let server = TestServer::start(ServerSpec::with_database(&database.url).toml(toml)).await;
    for name in names {
        issue_certificate(&server, name);
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_service_permissions_hold_and_every_read_and_refusal_is_audited() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start_with_policy(&database, POLICY, &["billing", "reader", "ops"]).await;

    // billing writes its own services; an event for another one is rejected on its own.
    let mut billing = IngestServiceClient::new(channel_as(&server, "billing").await);
    let mut events = vec![event("billing", "paid"), event("billing-eu", "paid")];
    events.push(sluice::proto::Event {
        user_id: "u-7".to_owned(),
        ..event("payments", "not yours")
    });
    let response = billing
        .publish(request(events))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!((response.accepted, response.rejected), (2, 1));
    assert_eq!(response.rejections[0].field, "service");
    assert!(
        response.rejections[0]
            .reason
            .contains("may not write service payments")
    );
    // ...and it may not read.
    let mut billing_reads = QueryServiceClient::new(channel_as(&server, "billing").await);
    let status = billing_reads
        .query(QueryRequest::default())
        .await
        .expect_err("no query scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "MISSING_SCOPE");

    // An unknown principal (the dev "client" certificate) has the default scopes: none. Health
    // stays open to it.
    let mut stranger = server.ingest_client().await;
    let status = stranger
        .publish(request(vec![event("billing", "x")]))
        .await
        .expect_err("no ingest scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        common::ingest_status(&server).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // ops (admin) writes a payments event; reader reads billing* only.
    let mut ops_ingest = IngestServiceClient::new(channel_as(&server, "ops").await);
    ops_ingest
        .publish(request(vec![event("payments", "admin wrote it")]))
        .await
        .expect("admin may write anything");
    let mut reader = QueryServiceClient::new(channel_as(&server, "reader").await);
    let status = reader
        .query(QueryRequest {
            services: vec!["payments".to_owned()],
            ..QueryRequest::default()
        })
        .await
        .expect_err("not its service");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "SERVICE_DENIED");
    let events = common::query_all(&mut reader, QueryRequest::default()).await;
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|event| event.service.starts_with("billing"))
    );
    let stats = reader
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert!(
        stats
            .services
            .iter()
            .all(|count| count.service.starts_with("billing"))
    );
    assert_eq!(stats.total_events, 2);
    assert!(
        stats.ingest.is_none() && stats.buffer.is_none(),
        "node-wide figures are for admins"
    );
    let status = reader
        .delete(DeleteRequest {
            user_id: "u-7".to_owned(),
            ..DeleteRequest::default()
        })
        .await
        .expect_err("no delete scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = reader
        .query(QueryRequest {
            page_token: "tampered!!".to_owned(),
            ..QueryRequest::default()
        })
        .await
        .expect_err("tampered token");
    assert_eq!(status.code(), Code::InvalidArgument);

    // ops deletes; the audit row commits with the deletion.
    let mut ops = QueryServiceClient::new(channel_as(&server, "ops").await);
    let mut delete = Request::new(DeleteRequest {
        services: vec!["payments".to_owned()],
        ..DeleteRequest::default()
    });
    delete
        .metadata_mut()
        .insert("x-request-id", "delete-42".parse().expect("ascii"));
    let deleted = ops.delete(delete).await.expect("delete").into_inner();
    assert_eq!(deleted.deleted, 1);

    let audit = ops
        .audit(AuditRequest::default())
        .await
        .expect("audit")
        .into_inner();
    let has = |principal: &str, rpc: &str, code: &str| {
        audit
            .entries
            .iter()
            .any(|entry| entry.principal == principal && entry.rpc == rpc && entry.code == code)
    };
    assert!(has("reader", "Query", "OK"));
    assert!(has("reader", "Query", "PERMISSION_DENIED"));
    assert!(has("reader", "Stats", "OK"));
    assert!(has("reader", "Delete", "PERMISSION_DENIED"));
    assert!(has("billing", "Query", "PERMISSION_DENIED"));
    assert!(has("client", "Publish", "PERMISSION_DENIED"));
    let delete_row = audit
        .entries
        .iter()
        .find(|entry| entry.rpc == "Delete" && entry.code == "OK")
        .expect("delete audited");
    let details =
        serde_json::Value::Object(delete_row.details.clone().expect("details").into_object());
    assert_eq!(details["rows"], 1);
    assert_eq!(details["request_id"], "delete-42");
    assert_eq!(details["filters"]["services"][0], "payments");
    let deletes_only = ops
        .audit(AuditRequest {
            rpc: "Delete".to_owned(),
            ..AuditRequest::default()
        })
        .await
        .expect("audit")
        .into_inner();
    assert!(
        deletes_only
            .entries
            .iter()
            .all(|entry| entry.rpc == "Delete")
    );
    let status = reader
        .audit(AuditRequest::default())
        .await
        .expect_err("admin only");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Nobody edits the log quietly.
    let mut connection = database.connect().await;
    for statement in [
        "UPDATE audit_log SET principal = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let refused = sqlx::query(statement).execute(&mut connection).await;
        assert!(refused.is_err(), "{statement} must be refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_whole_requests_with_quota_details_and_reload_on_sighup() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let limited = r#"
[[auth.principals]]
name = "limited"
scopes = ["ingest"]
events_per_second = 1
burst_events = 50
"#;
    let server = start_with_policy(&database, limited, &["limited"]).await;
    let mut client = IngestServiceClient::new(channel_as(&server, "limited").await);
    let batch = |count: usize| request((0..count).map(|_| event("limited", "e")).collect());
    client.publish(batch(40)).await.expect("within the burst");
    let status = client.publish(batch(40)).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    let details = status.get_error_details();
    let quota = details.quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "limited");
    assert_eq!(quota.violations[0].description, "events_per_second");
    let retry = details
        .retry_info()
        .and_then(|retry| retry.retry_delay)
        .expect("RetryInfo");
    assert!(
        retry > Duration::from_secs(20) && retry <= Duration::from_secs(60),
        "{retry:?}"
    );
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());

    // On IngestStream the refusal comes in the sequence's ack; the stream stays open.
    let requests = vec![IngestRequest {
        events: (0..40).map(|_| event("limited", "s")).collect(),
        sequence: 9,
    }];
    let mut acks = client
        .ingest_stream(tokio_stream::iter(requests))
        .await
        .expect("stream")
        .into_inner();
    let ack = acks.message().await.expect("ack").expect("one ack");
    assert_eq!(
        (ack.sequence, ack.code),
        (9, Code::ResourceExhausted as i32)
    );
    assert!(ack.retry_after.is_some());

    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_rate_limited_total",
            "principal=\"limited\""
        ) >= 2.0
    );
    assert!(
        metric_sum(
            &metrics,
            "sluice_events_refused_total",
            "reason=\"rate_limited\""
        ) >= 80.0
    );

    // Raise the limit and reload with SIGHUP: no restart.
    let raised = limited.replace("events_per_second = 1\n", "events_per_second = 100000\n");
    std::fs::write(server.dir_path().join("sluice.toml"), raised).expect("rewrite");
    let pid = nix::unistd::Pid::from_raw(server.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if client.publish(batch(40)).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload not applied:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.logs().contains("auth policy reloaded"));
    assert!(
        database
            .scalar("SELECT count(*) FROM audit_log WHERE rpc = 'Reload' AND code = 'OK'")
            .await
            >= 1
    );
}

/// A key pair made with openssl: (private key PEM, public key PEM).
fn openssl_key(dir: &Path, name: &str, algorithm: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let status = Command::new("openssl")
        .arg("genpkey")
        .args(algorithm)
        .arg("-out")
        .arg(&private)
        .status()
        .expect("openssl genpkey");
    assert!(status.success());
    let status = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .expect("openssl pkey");
    assert!(status.success());
    (
        std::fs::read(private).expect("key"),
        std::fs::read(public).expect("pub"),
    )
}

struct Signer {
    key: EncodingKey,
    algorithm: Algorithm,
    kid: String,
}

impl Signer {
    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.algorithm).expect("jwk");
        jwk.common.key_id = Some(self.kid.clone());
        jwk
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.key).expect("sign")
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(sub: &str, scope: &str) -> serde_json::Value {
    serde_json::json!({
        "sub": sub,
        "scope": scope,
        "iss": "https://issuer.test",
        "aud": "sluice",
        "exp": now() + 300,
        "nbf": now() - 10,
    })
}

fn write_jwks(path: &Path, signers: &[&Signer]) {
    let jwks = serde_json::json!({ "keys": signers.iter().map(|signer| signer.jwk()).collect::<Vec<_>>() });
    std::fs::write(path, jwks.to_string()).expect("write jwks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_checked_end_to_end_and_keys_rotate_without_a_restart() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let (rsa_private, rsa_public) = openssl_key(
        keys.path(),
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let (ec_private, _) = openssl_key(
        keys.path(),
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let rsa = Signer {
        key: EncodingKey::from_rsa_pem(&rsa_private).expect("rsa"),
        algorithm: Algorithm::RS256,
        kid: "rsa-1".to_owned(),
    };
    let ec = Signer {
        key: EncodingKey::from_ec_pem(&ec_private).expect("ec"),
        algorithm: Algorithm::ES256,
        kid: "ec-1".to_owned(),
    };
    let jwks = keys.path().join("jwks.json");
    write_jwks(&jwks, &[&rsa, &ec]);
    let toml = format!(
        r#"
[auth.jwt]
jwks_file = "{}"
issuer = "https://issuer.test"
audience = "sluice"

[[auth.principals]]
name = "svc-a"
kind = "token"
scopes = ["ingest", "query"]
services = ["svc-a"]
events_per_second = 250
burst_events = 500
"#,
        jwks.display()
    );
    // Its own logs also go out over OTLP, sluice's at debug: the exported records are checked for
    // secrets like the log lines.
    let (collector, receiver) = common::otlp::Receiver::start().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .toml(&toml)
            .env(
                "SLUICE_TELEMETRY__OTLP_ENDPOINT",
                &format!("http://{collector}"),
            )
            .env("SLUICE_TELEMETRY__LOG_LEVEL", "info,sluice=debug"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let mut query = server.query_client().await;
    let publish = |token: &str| with_token(request(vec![event("svc-a", "t")]), token);

    // Valid tokens, RSA and EC. The token's scopes narrow the principal's: this one has
    // ingest only.
    for signer in [&rsa, &ec] {
        let token = signer.sign(&claims("svc-a", "ingest"));
        let response = ingest.publish(publish(&token)).await.expect("valid token");
        assert_eq!(response.into_inner().accepted, 1);
        let status = query
            .query(with_token(QueryRequest::default(), &token))
            .await
            .expect_err("token lacks query");
        assert_eq!(status.code(), Code::PermissionDenied);
    }

    let mut expired = claims("svc-a", "ingest");
    expired["exp"] = serde_json::json!(now() - 3_600);
    let mut early = claims("svc-a", "ingest");
    early["nbf"] = serde_json::json!(now() + 3_600);
    let mut wrong_issuer = claims("svc-a", "ingest");
    wrong_issuer["iss"] = serde_json::json!("https://evil.test");
    let mut wrong_audience = claims("svc-a", "ingest");
    wrong_audience["aud"] = serde_json::json!("someone-else");
    // A configured audience or issuer is required: a token without the claim is refused as
    // one that names another.
    let mut no_audience = claims("svc-a", "ingest");
    no_audience.as_object_mut().expect("object").remove("aud");
    let mut no_issuer = claims("svc-a", "ingest");
    no_issuer.as_object_mut().expect("object").remove("iss");
    let unsigned = {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
            URL_SAFE_NO_PAD.encode(claims("svc-a", "ingest").to_string())
        )
    };
    // Algorithm confusion: HS256 keyed with the RSA public key, under the RSA key's kid.
    let confused = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".to_owned());
        encode(
            &header,
            &claims("svc-a", "ingest"),
            &EncodingKey::from_secret(&rsa_public).expect("hmac key"),
        )
        .expect("sign")
    };
    let unknown_kid = Signer {
        key: EncodingKey::from_rsa_pem(&rsa_private).expect("rsa"),
        algorithm: Algorithm::RS256,
        kid: "nobody".to_owned(),
    }
    .sign(&claims("svc-a", "ingest"));
    // A character in the middle of the signature changed (the last one may carry padding bits
    // and would make the base64 itself invalid).
    let bad_signature = {
        let token = rsa.sign(&claims("svc-a", "ingest"));
        let at = token.len() - 20;
        let replacement = if &token[at..=at] == "A" { "B" } else { "A" };
        format!("{}{replacement}{}", &token[..at], &token[at + 1..])
    };
    let cases = [
        ("expired", rsa.sign(&expired), "expired"),
        ("not yet valid", rsa.sign(&early), "not valid yet"),
        ("wrong issuer", rsa.sign(&wrong_issuer), "issuer"),
        ("wrong audience", rsa.sign(&wrong_audience), "audience"),
        ("no audience", rsa.sign(&no_audience), "audience (aud)"),
        ("no issuer", rsa.sign(&no_issuer), "issuer (iss)"),
        ("alg none", unsigned, "none"),
        ("algorithm confusion", confused, "algorithm"),
        ("unknown kid", unknown_kid, "kid"),
        ("bad signature", bad_signature, "signature"),
        ("malformed header", "abc.def.ghi".to_owned(), "malformed"),
        (
            "reserved subject",
            rsa.sign(&claims("(operator)", "admin")),
            "subject",
        ),
    ];
    for (case, token, words) in cases {
        let status = ingest.publish(publish(&token)).await.expect_err(case);
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert!(
            status.message().contains(words),
            "{case}: {}",
            status.message()
        );
        assert!(!status.message().contains("BEGIN"), "no key material");
    }
    // A signed token for a subject that is not configured gets the default scopes (none
    // here), whatever scopes it claims.
    let stranger = rsa.sign(&claims("stranger", "ingest admin"));
    let status = ingest
        .publish(publish(&stranger))
        .await
        .expect_err("unknown subject");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'svc-a'")
            .await,
        2,
        "refused tokens stored nothing"
    );

    // grpcurl with a bearer token.
    let token = rsa.sign(&claims("svc-a", "ingest"));
    let grpcurl = std::env::var("TEST_SLUICE_GRPCURL").expect("grpcurl");
    let output = Command::new(grpcurl)
        .arg("-cacert")
        .arg(server.cert_dir.join("ca.pem"))
        .arg("-cert")
        .arg(server.cert_dir.join("client.pem"))
        .arg("-key")
        .arg(server.cert_dir.join("client.key"))
        .args(["-H", &format!("authorization: Bearer {token}")])
        .args([
            "-d",
            &format!(
                r#"{{"events":[{{"service":"svc-a","message":"from grpcurl","timestamp":"{}"}}]}}"#,
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            &format!("localhost:{}", server.addr.port()),
            "sluice.v1.IngestService/Publish",
        ])
        .output()
        .expect("run grpcurl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The Python grpcio client with --token: the principal's rate limit refuses some of its
    // client-stream calls, and it resends after RetryInfo until all are in.
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    for index in 0..2_000 {
        use std::io::Write;
        writeln!(
            file,
            r#"{{"id":"{}","service":"svc-a","message":"py {index}"}}"#,
            uuid::Uuid::new_v4()
        )
        .expect("write");
    }
    let token = rsa.sign(&claims("svc-a", "ingest"));
    let python = std::env::var("TEST_SLUICE_PYTHON").expect("TEST_SLUICE_PYTHON");
    let output = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/clients/python/sluice_client.py"
        ))
        .args([
            "--addr",
            &format!("localhost:{}", server.addr.port()),
            "--certs",
        ])
        .arg(&server.cert_dir)
        .args(["--token", &token, "ingest"])
        .arg(file.path())
        .args(["--batch", "250"])
        .output()
        .expect("run the python client");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json summary");
    assert_eq!(summary["accepted"], 2_000, "{summary}");
    assert!(
        summary["refusals"].as_u64() > Some(0),
        "rate limited: {summary}"
    );

    // Rotation: a new key in the JWKS file is used without a restart.
    let (rotated_private, _) = openssl_key(
        keys.path(),
        "ec2",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let rotated = Signer {
        key: EncodingKey::from_ec_pem(&rotated_private).expect("ec"),
        algorithm: Algorithm::ES256,
        kid: "ec-2".to_owned(),
    };
    std::thread::sleep(Duration::from_millis(1_100));
    write_jwks(&jwks, &[&rotated]);
    let token = rotated.sign(&claims("svc-a", "ingest"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ingest.publish(publish(&token)).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "rotated key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let retired = rsa.sign(&claims("svc-a", "ingest"));
    let status = ingest
        .publish(publish(&retired))
        .await
        .expect_err("retired key");
    assert_eq!(status.code(), Code::Unauthenticated);

    // Nothing secret reached the logs of this run: no token (every JWT segment is base64url
    // JSON, "eyJ…"), no signature of one, no key material, no Authorization header.
    let logs = server.logs();
    assert!(
        logs.contains("rate limit") || logs.contains("principal"),
        "the run logged its calls:\n{logs}"
    );
    for token in [&token, &retired, &stranger] {
        let signature = token.rsplit('.').next().expect("signature");
        assert!(!logs.contains(signature), "a token signature was logged");
    }
    for secret in ["eyJ", "BEGIN", "PRIVATE KEY", "Bearer", "authorization"] {
        assert!(
            !logs.contains(secret),
            "{secret:?} appears in the logs:\n{logs}"
        );
    }
    // The same for every record exported over OTLP: bodies, attributes, span fields.
    let records = receiver
        .logs_until(|records| records.iter().any(|record| record.body().contains("JWKS")))
        .await;
    let exported = format!("{records:?}");
    for token in [&token, &retired, &stranger] {
        let signature = token.rsplit('.').next().expect("signature");
        assert!(
            !exported.contains(signature),
            "a token signature was exported"
        );
    }
    for secret in ["eyJ", "BEGIN", "PRIVATE KEY", "Bearer", "authorization"] {
        assert!(
            !exported.contains(secret),
            "{secret:?} appears in the exported records:\n{exported}"
        );
    }
}

/// An RSA signer of test tokens, its JWKS file written in `dir`.
fn rsa_signer(dir: &Path) -> (Signer, std::path::PathBuf) {
    let (private, _) = openssl_key(
        dir,
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let signer = Signer {
        key: EncodingKey::from_rsa_pem(&private).expect("rsa"),
        algorithm: Algorithm::RS256,
        kid: "rsa-1".to_owned(),
    };
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[&signer]);
    (signer, jwks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_tokens_claim_only_principals_of_their_own_kind() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let (rsa, jwks) = rsa_signer(keys.path());
    let toml = format!(
        r#"
[auth.jwt]
jwks_file = "{}"
issuer = "https://issuer.test"
audience = "sluice"

[[auth.principals]]
name = "ops"
scopes = ["admin"]

[[auth.principals]]
name = "robot"
kind = "token"
scopes = ["admin"]
"#,
        jwks.display()
    );
    let server = start_with_policy(&database, &toml, &["ops", "robot", "(operator)"]).await;

    // A certificate named after a token principal is a stranger: the default grant.
    let mut robot_certificate = QueryServiceClient::new(channel_as(&server, "robot").await);
    let status = robot_certificate
        .audit(AuditRequest::default())
        .await
        .expect_err("a certificate cannot claim a token principal");
    assert_eq!(status.code(), Code::PermissionDenied);
    // A token whose subject names a certificate principal is a stranger too.
    let mut query = server.query_client().await;
    let status = query
        .audit(with_token(
            AuditRequest::default(),
            &rsa.sign(&claims("ops", "admin")),
        ))
        .await
        .expect_err("a token cannot claim a certificate principal");
    assert_eq!(status.code(), Code::PermissionDenied);
    // Each, with its own kind of credential, has its rights.
    QueryServiceClient::new(channel_as(&server, "ops").await)
        .audit(AuditRequest::default())
        .await
        .expect("ops by its certificate");
    let token = rsa.sign(&claims("robot", "admin"));
    query
        .stats(with_token(StatsRequest::default(), &token))
        .await
        .expect("robot by its token");

    // A certificate may not take a name reserved for the server's own rows.
    let mut operator = QueryServiceClient::new(channel_as(&server, "(operator)").await);
    let status = operator
        .stats(StatsRequest::default())
        .await
        .expect_err("reserved identity");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "RESERVED_IDENTITY");

    // A token that rides on a certificate: the audit row names both.
    let rows = query
        .audit(with_token(
            AuditRequest {
                principal: "robot".to_owned(),
                rpc: "Stats".to_owned(),
                ..AuditRequest::default()
            },
            &token,
        ))
        .await
        .expect("audit")
        .into_inner()
        .entries;
    let details = rows[0].details.clone().expect("details").to_struct();
    assert_eq!(
        details.fields["certificate"].kind,
        Some(prost_types::value::Kind::StringValue("client".to_owned())),
        "{details:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_jwks_file_keeps_its_keys_for_max_stale_then_every_token_is_refused() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let (rsa, jwks) = rsa_signer(keys.path());
    let toml = format!(
        r#"
[auth.jwt]
jwks_file = "{}"
issuer = "https://issuer.test"
audience = "sluice"
max_stale = "10s"

[[auth.principals]]
name = "svc-a"
kind = "token"
scopes = ["ingest"]
"#,
        jwks.display()
    );
    let server = start_with_policy(&database, &toml, &[]).await;
    let mut ingest = server.ingest_client().await;
    let publish = |token: &str| with_token(request(vec![event("svc-a", "t")]), token);
    let token = rsa.sign(&claims("svc-a", "ingest"));
    ingest.publish(publish(&token)).await.expect("fresh keys");

    // The file is gone: the keys in hand stay in use (a rewrite in progress must not lock
    // everyone out), and the staleness shows in metrics.
    std::fs::remove_file(&jwks).expect("remove the JWKS file");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = server.metrics().await;
        if metric_sum(&metrics, "sluice_jwks_stale_seconds", "") > 0.0 {
            assert!(
                metrics.contains("sluice_health_check{check=\"jwks\"} 0"),
                "{metrics}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "staleness never shown"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past max_stale, every token is refused: revocation fails closed.
    let refused = loop {
        match ingest.publish(publish(&token)).await {
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "stale keys kept for ever"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("keys"), "{refused:?}");
    // A good file again: tokens pass.
    write_jwks(&jwks, &[&rsa]);
    while ingest.publish(publish(&token)).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new file never taken"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_grouped_by_reason_and_rows_stay_bounded_whatever_a_client_sends() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let policy = r#"
[[auth.principals]]
name = "reader"
scopes = ["query"]
services = ["billing"]

[[auth.principals]]
name = "ops"
scopes = ["admin"]
"#;
    let server = start_with_policy(&database, policy, &["reader", "ops"]).await;
    let mut reader = QueryServiceClient::new(channel_as(&server, "reader").await);
    // Services the client makes up: each refusal's message names one, but they are one kind.
    for index in 0..300 {
        let status = reader
            .query(QueryRequest {
                services: vec![format!("made-up-{index}")],
                ..QueryRequest::default()
            })
            .await
            .expect_err("not its service");
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    // A Tail naming its service 15,000 times is refused before anything is kept of it.
    let status = reader
        .tail(sluice::proto::TailRequest {
            services: vec!["billing".to_owned(); 15_000],
            ..Default::default()
        })
        .await
        .expect_err("too many services");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut ops = QueryServiceClient::new(channel_as(&server, "ops").await);
    ops.audit(AuditRequest::default())
        .await
        .expect("flushes the refusals");
    assert_eq!(
        database
            .scalar(
                "SELECT count(*) FROM audit_log WHERE principal = 'reader' AND rpc = 'Query' \
                 AND code = 'PERMISSION_DENIED'"
            )
            .await,
        1,
        "one row for the kind of refusal"
    );
    assert_eq!(
        database
            .scalar(
                "SELECT (details->>'count')::bigint FROM audit_log WHERE principal = 'reader' \
                 AND rpc = 'Query' AND code = 'PERMISSION_DENIED'"
            )
            .await,
        300
    );
    assert!(
        database
            .scalar("SELECT max(octet_length(details::text))::bigint FROM audit_log")
            .await
            < 20_000,
        "no row holds what a client chose to send at length"
    );
}
