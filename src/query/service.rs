//! The `QueryService` trait impl: every method admits the call through the RPC envelope and
//! hands it to the file of its RPC. Reads live in this folder; Delete, Anonymize and
//! OptOut/OptIn in `erasure`; Restore beside the archive.

use std::sync::Arc;

use serde_json::Value as Json;
use tonic::{Request, Response, Status};

use super::{Reader, audit_log, export, search, stats, tail};
use crate::{
    archive::restore,
    erasure::{self, Erasure},
    proto::{
        AnonymizeRequest, AnonymizeResponse, AuditRequest, AuditResponse, DeleteRequest,
        DeleteResponse, ExportRequest, OptInRequest, OptInResponse, OptOutRequest, OptOutResponse,
        QueryRequest, QueryResponse, RestoreRequest, StatsRequest, StatsResponse, TailRequest,
        query_service_server::QueryService,
    },
    rpc::{Admission, Rpc},
};

/// Serves `sluice.v1.QueryService`. Cheap to clone.
#[derive(Clone)]
pub struct QueryHandler {
    admission: Arc<Admission>,
    reader: Arc<Reader>,
    erasure: Arc<Erasure>,
}

impl QueryHandler {
    pub fn new(admission: Arc<Admission>, reader: Arc<Reader>, erasure: Arc<Erasure>) -> Self {
        Self {
            admission,
            reader,
            erasure,
        }
    }
}

fn empty_details() -> Json {
    Json::Object(Default::default())
}

#[tonic::async_trait]
impl QueryService for QueryHandler {
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let call = self
            .admission
            .admit(&request, Rpc::Query, &request.get_ref().services)?;
        let mut details = empty_details();
        let result = search::query(
            &self.reader,
            &call.caller,
            request.into_inner(),
            &mut details,
        )
        .await;
        self.admission
            .audited(&call, details, result)
            .await
            .map(Response::new)
    }

    type ExportStream = export::ExportStream;

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let call = self
            .admission
            .admit(&request, Rpc::Export, &request.get_ref().services)?;
        export::serve(&self.reader, &self.admission, call, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let call = self
            .admission
            .admit(&request, Rpc::Delete, &request.get_ref().services)?;
        let (erasure, admission) = (self.erasure.clone(), self.admission.clone());
        erasure::delete::serve(erasure, admission, call, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let call = self.admission.admit(&request, Rpc::Stats, &[])?;
        let result = stats::stats(&self.reader, &call.caller, request.into_inner()).await;
        let details = serde_json::json!({ "services": call.caller.service_patterns() });
        self.admission
            .audited(&call, details, result)
            .await
            .map(Response::new)
    }

    async fn audit(
        &self,
        request: Request<AuditRequest>,
    ) -> Result<Response<AuditResponse>, Status> {
        let call = self.admission.admit(&request, Rpc::Audit, &[])?;
        let request = request.into_inner();
        let details = serde_json::json!({ "principal": request.principal, "rpc": request.rpc });
        // Refusals counted since the last flush are part of the answer.
        let audit = self.admission.audit();
        audit.flush().await;
        let result = audit_log::page(audit.pool(), request).await;
        self.admission
            .audited(&call, details, result)
            .await
            .map(Response::new)
    }

    type RestoreStream = restore::RestoreStream;

    async fn restore(
        &self,
        request: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let call = self
            .admission
            .admit(&request, Rpc::Restore, &request.get_ref().services)?;
        let reader = &self.reader;
        restore::serve(
            reader.store.maintenance_pool.clone(),
            reader.archive.clone(),
            self.admission.clone(),
            call,
            request.into_inner(),
            &reader.config.validation,
            &reader.privacy.load(),
        )
        .await
        .map(Response::new)
    }

    async fn opt_out(
        &self,
        request: Request<OptOutRequest>,
    ) -> Result<Response<OptOutResponse>, Status> {
        let call = self
            .admission
            .admit(&request, Rpc::OptOut, &request.get_ref().services)?;
        let mut details = empty_details();
        let result = erasure::optout::opt_out(
            &self.erasure,
            &call.caller,
            request.into_inner(),
            &mut details,
        )
        .await;
        self.admission
            .audited(&call, details, result)
            .await
            .map(Response::new)
    }

    async fn opt_in(
        &self,
        request: Request<OptInRequest>,
    ) -> Result<Response<OptInResponse>, Status> {
        let call = self
            .admission
            .admit(&request, Rpc::OptIn, &request.get_ref().services)?;
        let mut details = empty_details();
        let result = erasure::optout::opt_in(
            &self.erasure,
            &call.caller,
            request.into_inner(),
            &mut details,
        )
        .await;
        self.admission
            .audited(&call, details, result)
            .await
            .map(Response::new)
    }

    async fn anonymize(
        &self,
        request: Request<AnonymizeRequest>,
    ) -> Result<Response<AnonymizeResponse>, Status> {
        let call = self.admission.admit(&request, Rpc::Anonymize, &[])?;
        let (erasure, admission) = (self.erasure.clone(), self.admission.clone());
        erasure::anonymize::serve(erasure, admission, call, request.into_inner())
            .await
            .map(Response::new)
    }

    type TailStream = tail::TailStream;

    async fn tail(
        &self,
        request: Request<TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let call = self
            .admission
            .admit(&request, Rpc::Tail, &request.get_ref().services)?;
        tail::serve(&self.reader, &self.admission, call, request.into_inner())
            .await
            .map(Response::new)
    }
}
