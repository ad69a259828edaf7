//! OTLP/HTTP: `POST /v1/logs` on a listener of its own (`otlp.http_listen`, TLS and client
//! certificates like the gRPC port), with the same handler as `LogsService/Export` over gRPC.
//!
//! - Bodies are `application/x-protobuf` or `application/json` (OTLP/JSON: hex ids, enums as
//!   numbers, 64-bit integers as strings), optionally `Content-Encoding: gzip` or `zstd`. The
//!   body as sent and as decompressed are both capped at `otlp.max_request_bytes` before they
//!   are held: a larger one, or a compression bomb, is `413` with nothing more read.
//! - The answer is an `ExportLogsServiceResponse` in the request's encoding; a refusal is the
//!   HTTP code the OTLP specification gives, with a `google.rpc.Status` body in the request's
//!   encoding: `400` malformed or invalid, `401`/`403` authentication and rights, `429` rate
//!   limited and `503` for the other transient refusals, both with `Retry-After`, which OTLP
//!   exporters retry; `413`/`415` for bodies sluice does not take.
//! - The bearer token rides in `Authorization`, as over gRPC; `x-request-id` is kept or made,
//!   echoed, and names the call in the audit log and its span.

use std::io::Read;

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header},
    routing::post,
};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use prost::Message;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

use super::OtlpLogsHandler;
use crate::{metrics, proto::otlp::EncodedLogsRequest, rpc::Rpc, telemetry};

/// The path OTLP/HTTP exporters send logs to.
pub const LOGS_PATH: &str = "/v1/logs";

/// Why a body was not read as an OTLP request. Each is answered with its own HTTP code.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("content-type {0:?} is not served: send application/x-protobuf or application/json")]
    UnsupportedType(String),
    #[error("content-encoding {0:?} is not served: send gzip, zstd, or no encoding")]
    UnsupportedEncoding(String),
    #[error("the request is larger than otlp.max_request_bytes ({max} bytes){stage}")]
    TooLarge { max: usize, stage: &'static str },
    #[error("the request body cannot be read: {0}")]
    Body(String),
    #[error("the request body is not valid {encoding}: {reason}")]
    Compression {
        encoding: &'static str,
        reason: String,
    },
    #[error("the request is not a valid {format} ExportLogsServiceRequest: {reason}")]
    Malformed {
        format: &'static str,
        reason: String,
    },
}

impl HttpError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::UnsupportedType(_) | Self::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Body(_) | Self::Compression { .. } | Self::Malformed { .. } => {
                StatusCode::BAD_REQUEST
            }
        }
    }
}

/// The body encodings of OTLP/HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Protobuf,
    Json,
}

impl Format {
    fn of(headers: &HeaderMap) -> Result<Self, HttpError> {
        let value = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        // Parameters (`; charset=utf-8`) do not change the encoding.
        let media_type = value.split(';').next().unwrap_or_default().trim();
        match media_type.to_ascii_lowercase().as_str() {
            "application/x-protobuf" | "application/protobuf" => Ok(Self::Protobuf),
            "application/json" => Ok(Self::Json),
            _ => Err(HttpError::UnsupportedType(value.to_owned())),
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Protobuf => "application/x-protobuf",
            Self::Json => "application/json",
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Protobuf => "protobuf",
            Self::Json => "OTLP/JSON",
        }
    }

    /// The request in protobuf: a protobuf body as it is (it is checked as it is mapped, as
    /// on gRPC), an OTLP/JSON one parsed and encoded.
    fn decode(self, body: Bytes) -> Result<EncodedLogsRequest, HttpError> {
        match self {
            Self::Protobuf => Ok(EncodedLogsRequest::new(body)),
            Self::Json => serde_json::from_slice::<ExportLogsServiceRequest>(&body)
                .map(|request| EncodedLogsRequest::from(&request))
                .map_err(|error| HttpError::Malformed {
                    format: self.name(),
                    reason: error.to_string(),
                }),
        }
    }

    fn encode_response(self, response: &ExportLogsServiceResponse) -> Vec<u8> {
        match self {
            Self::Protobuf => response.encode_to_vec(),
            // Serializing a generated message to a Vec cannot fail.
            Self::Json => serde_json::to_vec(response).unwrap_or_default(),
        }
    }

    /// A `google.rpc.Status` for `status`, with its details (RetryInfo, BadRequest, ...) in
    /// protobuf; code and message in JSON.
    fn encode_status(self, status: &Status) -> Vec<u8> {
        match self {
            Self::Protobuf if !status.details().is_empty() => status.details().to_vec(),
            Self::Protobuf => tonic_types::pb::Status {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: Vec::new(),
            }
            .encode_to_vec(),
            Self::Json => serde_json::json!({
                "code": status.code() as i32,
                "message": status.message(),
            })
            .to_string()
            .into_bytes(),
        }
    }
}

/// The body's `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn of(headers: &HeaderMap) -> Result<Self, HttpError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Self::None);
        };
        let text = value.to_str().unwrap_or_default();
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Self::None),
            "gzip" | "x-gzip" => Ok(Self::Gzip),
            "zstd" => Ok(Self::Zstd),
            _ => Err(HttpError::UnsupportedEncoding(text.to_owned())),
        }
    }

    /// The body decompressed, refused as soon as it would pass `max` bytes.
    fn decompress(self, body: Bytes, max: usize) -> Result<Bytes, HttpError> {
        match self {
            Self::None => Ok(body),
            Self::Gzip => read_capped(
                "gzip",
                Ok(flate2::read::MultiGzDecoder::new(&body[..])),
                max,
            ),
            Self::Zstd => read_capped("zstd", zstd::stream::read::Decoder::new(&body[..]), max),
        }
    }
}

/// Reads at most `max` bytes from the `encoding` decoder; one more is an error, and nothing
/// past it is decompressed.
fn read_capped(
    encoding: &'static str,
    decoder: std::io::Result<impl Read>,
    max: usize,
) -> Result<Bytes, HttpError> {
    let failed = |error: std::io::Error| HttpError::Compression {
        encoding,
        reason: error.to_string(),
    };
    let mut out = Vec::new();
    decoder
        .map_err(failed)?
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(failed)?;
    if out.len() > max {
        return Err(HttpError::TooLarge {
            max,
            stage: " once decompressed",
        });
    }
    Ok(Bytes::from(out))
}

#[derive(Clone)]
struct Endpoint {
    handler: OtlpLogsHandler,
    max_request_bytes: usize,
}

/// The OTLP/HTTP routes over `handler`.
pub fn router(handler: OtlpLogsHandler, max_request_bytes: usize) -> Router {
    Router::new()
        .route(LOGS_PATH, post(export_logs))
        .with_state(Endpoint {
            handler,
            max_request_bytes,
        })
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

async fn export_logs(State(endpoint): State<Endpoint>, request: Request<Body>) -> Response<Body> {
    let span = call_span(request.headers());
    let started = std::time::Instant::now();
    let (format, answer) = export(&endpoint, request).instrument(span).await;
    let code = match &answer {
        Ok(_) => Code::Ok,
        Err(Refusal::Status(status)) => status.code(),
        // A body sluice does not take is the client's to fix.
        Err(Refusal::Http(_)) => Code::InvalidArgument,
    };
    metrics::rpc_finished(Rpc::OtlpLogs.name(), code, started.elapsed());
    match answer {
        Ok(response) => respond(
            StatusCode::OK,
            format,
            format.encode_response(&response),
            None,
        ),
        Err(Refusal::Status(status)) => {
            let retry_after = status
                .get_details_retry_info()
                .and_then(|info| info.retry_delay)
                // Whole seconds, rounded up: a client never comes back before the advice.
                .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
            respond(
                http_code(&status),
                format,
                format.encode_status(&status),
                retry_after,
            )
        }
        Err(Refusal::Http(error)) => {
            let status = Status::invalid_argument(error.to_string());
            respond(
                error.status_code(),
                format,
                format.encode_status(&status),
                None,
            )
        }
    }
}

enum Refusal {
    Http(HttpError),
    Status(Status),
}

/// Reads, decodes and exports one request. The format answers are written in is the
/// request's, or protobuf when the request's is not one OTLP has.
async fn export(
    endpoint: &Endpoint,
    request: Request<Body>,
) -> (Format, Result<ExportLogsServiceResponse, Refusal>) {
    let format = match Format::of(request.headers()) {
        Ok(format) => format,
        Err(error) => return (Format::Protobuf, Err(Refusal::Http(error))),
    };
    let read = async {
        let compression = Compression::of(request.headers())?;
        let (parts, body) = request.into_parts();
        let max = endpoint.max_request_bytes;
        let body = Limited::new(body, max)
            .collect()
            .await
            .map_err(|error| {
                if error.downcast_ref::<LengthLimitError>().is_some() {
                    HttpError::TooLarge { max, stage: "" }
                } else {
                    HttpError::Body(error.to_string())
                }
            })?
            .to_bytes();
        let body = compression.decompress(body, max)?;
        let message = format.decode(body)?;
        Ok::<_, HttpError>(tonic::Request::from_http(Request::from_parts(
            parts, message,
        )))
    };
    let request = match read.await {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, "otlp/http request refused");
            return (format, Err(Refusal::Http(error)));
        }
    };
    let answer = endpoint
        .handler
        .export_call(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(Refusal::Status);
    (format, answer)
}

/// The HTTP code OTLP/HTTP gives a gRPC refusal.
fn http_code(status: &Status) -> StatusCode {
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable
            if status
                .get_details_error_info()
                .is_some_and(|info| info.reason == "RATE_LIMITED") =>
        {
            StatusCode::TOO_MANY_REQUESTS
        }
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn respond(
    code: StatusCode,
    format: Format,
    body: Vec<u8>,
    retry_after_seconds: Option<u64>,
) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, format.content_type());
    if let Some(seconds) = retry_after_seconds {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

/// The span of one OTLP/HTTP call, like a gRPC call's (the envelope adds the principal).
fn call_span(headers: &HeaderMap) -> tracing::Span {
    let request_id = headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "rpc",
        otel.name = LOGS_PATH,
        otel.kind = "server",
        rpc.system = "otlp_http",
        method = LOGS_PATH,
        rpc = Rpc::OtlpLogs.name(),
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        principal = tracing::field::Empty,
    );
    telemetry::adopt_caller(&span, headers);
    span
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(name, HeaderValue::from_str(value).expect("header"));
        }
        headers
    }

    #[test]
    fn the_format_is_read_from_the_content_type_with_or_without_parameters() {
        let format = |value: &str| Format::of(&headers(&[(header::CONTENT_TYPE, value)]));
        assert_eq!(
            format("application/x-protobuf").ok(),
            Some(Format::Protobuf)
        );
        assert_eq!(
            format("application/json; charset=utf-8").ok(),
            Some(Format::Json)
        );
        assert!(matches!(
            format("text/plain"),
            Err(HttpError::UnsupportedType(_))
        ));
        assert!(matches!(
            Format::of(&HeaderMap::new()),
            Err(HttpError::UnsupportedType(_))
        ));
    }

    #[test]
    fn a_gzip_bomb_is_refused_at_the_cap_without_decompressing_the_rest() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder
            .write_all(&vec![0u8; 64 * 1024 * 1024])
            .expect("gzip");
        let bomb = Bytes::from(encoder.finish().expect("gzip"));
        assert!(bomb.len() < 256 * 1024, "{} bytes", bomb.len());
        assert!(matches!(
            Compression::Gzip.decompress(bomb, 1024 * 1024),
            Err(HttpError::TooLarge { max: 1_048_576, .. })
        ));
    }

    #[test]
    fn zstd_and_gzip_bodies_within_the_cap_decompress_and_garbage_is_a_bad_request() {
        let body = b"hello otlp".repeat(100);
        let zstd = zstd::encode_all(&body[..], 3).expect("zstd");
        assert_eq!(
            &Compression::Zstd
                .decompress(Bytes::from(zstd), 4096)
                .expect("zstd")[..],
            &body[..]
        );
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&body).expect("gzip");
        let gzip = Bytes::from(encoder.finish().expect("gzip"));
        assert_eq!(
            &Compression::Gzip.decompress(gzip, 4096).expect("gzip")[..],
            &body[..]
        );
        let garbage = Compression::Gzip.decompress(Bytes::from_static(b"not gzip"), 4096);
        assert!(matches!(garbage, Err(HttpError::Compression { .. })));
        assert_eq!(
            garbage.err().map(|error| error.status_code()),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn refusals_map_to_the_http_codes_otlp_exporters_act_on() {
        let unavailable = crate::proto::status::refusal(
            Code::Unavailable,
            "buffer is full".to_owned(),
            "BUFFER_FULL",
            Some(std::time::Duration::from_millis(300)),
            Default::default(),
        );
        assert_eq!(http_code(&unavailable), StatusCode::SERVICE_UNAVAILABLE);
        let limited = crate::proto::status::refusal(
            Code::Unavailable,
            "rate limited".to_owned(),
            "RATE_LIMITED",
            Some(std::time::Duration::from_secs(2)),
            Default::default(),
        );
        assert_eq!(http_code(&limited), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            http_code(&Status::unauthenticated("no")),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            http_code(&Status::permission_denied("no")),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            http_code(&Status::invalid_argument("no")),
            StatusCode::BAD_REQUEST
        );
        let protobuf = Format::Protobuf.encode_status(&unavailable);
        let decoded = tonic_types::pb::Status::decode(&protobuf[..]).expect("google.rpc.Status");
        assert_eq!(decoded.code, Code::Unavailable as i32);
        assert!(!decoded.details.is_empty(), "RetryInfo travels in the body");
    }
}
