//! OptOut and OptIn: a user's opt-out of tracking, for some services or all. Their events are
//! refused at ingest until OptIn. The user is recorded under the keyed hash of their id, so
//! the list itself names nobody; the key must outlive this process and be every node's.

use std::sync::Arc;

use serde_json::Value as Json;

use super::{Erasure, ErasureError};
use crate::{
    auth::Caller,
    backup::journal::Change,
    config::Config,
    filter::check_services,
    privacy::{fingerprints, optouts::OptInError},
    proto::{OptInRequest, OptInResponse, OptOutRequest, OptOutResponse},
};

pub async fn opt_out(
    erasure: &Erasure,
    caller: &Caller,
    request: OptOutRequest,
    details: &mut Json,
) -> Result<OptOutResponse, ErasureError> {
    let key = target(
        erasure,
        caller,
        &request.user_id,
        &request.services,
        details,
    )
    .await?;
    let change = Change::OptOut {
        user_key: key.clone(),
        services: request.services.clone(),
    };
    let journaled = erasure.journal_start(change, caller).await?;
    let mut connection = erasure.store.pool.acquire().await?;
    erasure
        .optouts
        .opt_out(&mut connection, &key, &request.services)
        .await?;
    erasure.journal_finish(journaled).await;
    Ok(OptOutResponse {})
}

pub async fn opt_in(
    erasure: &Erasure,
    caller: &Caller,
    request: OptInRequest,
    details: &mut Json,
) -> Result<OptInResponse, ErasureError> {
    let key = target(
        erasure,
        caller,
        &request.user_id,
        &request.services,
        details,
    )
    .await?;
    let change = Change::OptIn {
        user_key: key.clone(),
        services: request.services.clone(),
    };
    let journaled = erasure.journal_start(change, caller).await?;
    let was_opted_out = erasure
        .optouts
        .opt_in(&erasure.store.pool, &key, &request.services)
        .await
        .map_err(|error| match error {
            OptInError::EveryService => ErasureError::invalid("services", error.to_string()),
            OptInError::Database(error) => ErasureError::Database(error),
        })?;
    erasure.journal_finish(journaled).await;
    Ok(OptInResponse { was_opted_out })
}

/// Checks an OptOut or OptIn (services named by their rule, every service only for an
/// unrestricted caller) and gives the key the user is recorded under, noted in `details`.
async fn target(
    erasure: &Erasure,
    caller: &Caller,
    user_id: &str,
    services: &[String],
    details: &mut Json,
) -> Result<String, ErasureError> {
    details["services"] = Json::from(services.to_vec());
    check_services(services)?;
    // An opt-out of every service changes other teams' services too: only a caller that may
    // use every service may make one.
    if services.is_empty() && caller.service_patterns().is_some() {
        return Err(ErasureError::invalid(
            "services",
            "name the services: this principal may not use every service",
        ));
    }
    check_user_id(&erasure.config, user_id)?;
    // The key must outlive this process and be every node's: made persistent (the key file,
    // fingerprints recorded) on the first opt-out of a server whose privacy settings are all
    // off.
    if erasure.privacy.load().is_ephemeral() {
        let persistent =
            fingerprints::open_persistent(&erasure.config, &erasure.store.pool).await?;
        erasure.privacy.store(Arc::new(persistent));
    }
    let key = erasure.privacy.load().hash(user_id);
    details["user_key"] = Json::from(key.clone());
    Ok(key)
}

/// A plain user id that events can carry: not empty, within `validation.max_user_id_bytes`,
/// no NUL.
pub fn check_user_id(config: &Config, user_id: &str) -> Result<(), ErasureError> {
    if user_id.is_empty() {
        return Err(ErasureError::invalid("user_id", "required: the user"));
    }
    if user_id.len() > config.validation.max_user_id_bytes || user_id.contains('\0') {
        return Err(ErasureError::invalid(
            "user_id",
            "not a user id events can carry (too long, or NUL)",
        ));
    }
    Ok(())
}
