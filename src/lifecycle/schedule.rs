//! The server's lifecycle schedule: the job every `lifecycle.interval` (the first run one
//! interval after start). A failed run is retried after 1 minute, then 2, 4, … up to the
//! interval; hot rows stay in place meanwhile.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;

use super::{RetentionPolicy, run_once};
use crate::{archive::Archive, backoff::Backoff};

/// The first wait after a failed run.
const FIRST_RETRY: Duration = Duration::from_secs(60);

/// Runs until the task is dropped.
pub async fn run(
    pool: PgPool,
    retention: Arc<RetentionPolicy>,
    archive: Arc<Archive>,
    interval: Duration,
) {
    let mut wait = interval;
    let mut retry = Backoff::new(FIRST_RETRY.min(interval), interval);
    loop {
        tokio::time::sleep(wait).await;
        wait = match run_once(&pool, &retention, &archive).await {
            Ok(_) => {
                retry.reset();
                interval
            }
            Err(error) => {
                let wait = retry.next_delay();
                tracing::error!(%error, retry_in = ?wait, "lifecycle run failed; hot rows stay in place");
                wait
            }
        };
    }
}
