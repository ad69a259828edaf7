//! `opentelemetry.proto.collector.logs.v1.LogsService/Export`: an OTLP request mapped record
//! by record ([`super::mapping`]) and taken through the ingest pipeline as one request.

use std::sync::Arc;

use chrono::Utc;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceResponse,
};
use tonic::{Request, Response, Status};

use super::{OtlpError, mapping};
use crate::{
    event::EventRejection,
    ingest::IngestHandler,
    metrics::{self, OtlpOutcome},
    proto::{otlp::EncodedLogsRequest, otlp_logs::logs_service_server::LogsService},
    rpc::Rpc,
};

/// How many refusals the `partial_success` message describes; the count covers them all.
const MAX_DESCRIBED: usize = 5;

/// Serves OTLP logs through the ingest side. Cheap to clone.
#[derive(Clone)]
pub struct OtlpLogsHandler {
    ingest: IngestHandler,
    /// Attribute keys whose first present value is a record's user id.
    user_id_attributes: Arc<[String]>,
}

impl OtlpLogsHandler {
    pub fn new(ingest: IngestHandler, user_id_attributes: &[String]) -> Self {
        Self {
            ingest,
            user_id_attributes: user_id_attributes.into(),
        }
    }

    /// One export, from either protocol: gRPC, or OTLP/HTTP's body made into a request.
    pub(crate) async fn export_call(
        &self,
        request: Request<EncodedLogsRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let call = self
            .ingest
            .admission()
            .admit(&request, Rpc::OtlpLogs, &[])?;
        let encoded = request.get_ref().bytes();
        // Refused before it is mapped: the limit bounds the work a request costs, too.
        let records = mapping::count_records(encoded);
        if let Err(error) = self.ingest.check_request_size(records) {
            metrics::otlp_log_records(OtlpOutcome::Refused, records);
            return Err(OtlpError::from(error).into());
        }
        let mapped = mapping::map_request(encoded, records, &self.user_id_attributes, Utc::now())?;
        let records = mapped.events.len();
        let rejected = match self
            .ingest
            .ingest_batch(&call, mapped.events, &mapped.ids, &mapped.trace_ids)
            .await
        {
            Ok(rejected) => rejected,
            Err(error) => {
                metrics::otlp_log_records(OtlpOutcome::Refused, records);
                return Err(OtlpError::from(error).into());
            }
        };
        metrics::otlp_log_records(OtlpOutcome::Rejected, rejected.len());
        metrics::otlp_log_records(OtlpOutcome::Stored, records - rejected.len());
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: partial_success(&rejected),
        }))
    }
}

/// The records refused for good, as OTLP reports them: a count and a message that the
/// client logs (and must not retry). None when every record was taken.
pub fn partial_success(rejected: &[EventRejection]) -> Option<ExportLogsPartialSuccess> {
    if rejected.is_empty() {
        return None;
    }
    let described: Vec<String> = rejected
        .iter()
        .take(MAX_DESCRIBED)
        .map(|rejection| format!("record {}: {}", rejection.index, rejection.reason))
        .collect();
    let more = rejected.len().saturating_sub(MAX_DESCRIBED);
    let mut error_message = described.join("; ");
    if more > 0 {
        error_message.push_str(&format!("; and {more} more"));
    }
    Some(ExportLogsPartialSuccess {
        rejected_log_records: rejected.len() as i64,
        error_message,
    })
}

#[tonic::async_trait]
impl LogsService for OtlpLogsHandler {
    async fn export(
        &self,
        request: Request<EncodedLogsRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.export_call(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RejectReason;

    #[test]
    fn every_record_taken_is_no_partial_success_and_refusals_are_counted_and_described() {
        assert_eq!(partial_success(&[]), None);
        let rejected: Vec<EventRejection> = (0..7)
            .map(|index| EventRejection {
                index,
                event_id: String::new(),
                service: "svc".to_owned(),
                reason: RejectReason::MissingMessage,
            })
            .collect();
        let partial = partial_success(&rejected).expect("partial");
        assert_eq!(partial.rejected_log_records, 7);
        assert!(
            partial.error_message.starts_with("record 0: "),
            "{partial:?}"
        );
        assert!(partial.error_message.ends_with("and 2 more"), "{partial:?}");
    }
}
