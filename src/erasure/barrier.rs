//! The barrier of Delete and Anonymize: events accepted before the call must be covered, so
//! the call first waits until the buffer has handed them on (to PostgreSQL or the spool)
//! and, in Redis mode, until the broker has delivered every entry appended so far.

use std::time::Duration;

use super::ErasureError;
use crate::{broker::Broker, buffer::Buffer};

/// How long erasure waits for events accepted before it to be written.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for the events accepted before now; Busy (retry later) past [`BARRIER_TIMEOUT`].
pub async fn wait_for_accepted(
    buffer: &Buffer,
    broker: Option<&Broker>,
) -> Result<(), ErasureError> {
    let busy = ErasureError::Busy {
        retry_after: Duration::from_secs(5),
    };
    let deadline = tokio::time::Instant::now() + BARRIER_TIMEOUT;
    if !buffer.wait_for_admitted(BARRIER_TIMEOUT).await {
        return Err(busy);
    }
    let Some(broker) = broker else {
        return Ok(());
    };
    let mark = broker.mark().await?;
    while !broker.delivered_up_to(&mark).await? {
        if tokio::time::Instant::now() >= deadline {
            return Err(busy);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
