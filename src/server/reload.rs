//! SIGHUP reloads the `auth` section (principals, scopes, limits, JWKS) and the `privacy`
//! section and key file (checked against the stored fingerprints), all of it or none of it,
//! and audits each reload.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    audit::{Audit, Entry},
    auth::{AuthConfigError, Authorizer},
    config::{Config, ConfigError},
    privacy::{
        SharedPrivacy,
        fingerprints::{self, PrivacyStartError},
    },
};

/// Loads the configuration again (file, environment, flags) for a reload on SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// The principal of audit rows that the server writes on its own (reloads).
pub const OPERATOR: &str = "(operator)";

/// Why a reload was refused; the previous policy stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Privacy(#[from] PrivacyStartError),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
}

/// What a SIGHUP reloads.
pub struct Reloadable {
    pub auth: Arc<Authorizer>,
    pub privacy: SharedPrivacy,
    pub pool: sqlx::PgPool,
}

impl Reloadable {
    /// Applies the reloaded configuration, all of it or (on any error) none of it: the privacy
    /// keys are checked against the stored fingerprints first.
    async fn reload(&self, reloader: &Reloader) -> Result<(), ReloadError> {
        let config = reloader()?;
        let privacy = fingerprints::open(&config, &self.pool).await?;
        self.auth.reload(&config.auth)?;
        self.privacy.store(Arc::new(privacy));
        Ok(())
    }
}

/// Reloads on every SIGHUP, until the task is dropped.
pub async fn on_sighup(reloadable: Reloadable, audit: Arc<Audit>, reloader: Option<Reloader>) {
    let Some(reloader) = reloader else {
        return;
    };
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reloads need a restart");
        return;
    };
    while hangups.recv().await.is_some() {
        let outcome = reloadable.reload(&reloader).await;
        let (code, details) = match &outcome {
            Ok(()) => (tonic::Code::Ok, serde_json::json!({})),
            Err(error) => {
                tracing::error!(%error, "reload refused; the previous policy stays in force");
                (
                    tonic::Code::InvalidArgument,
                    serde_json::json!({ "error": error.to_string() }),
                )
            }
        };
        audit
            .record(Entry {
                principal: OPERATOR.to_owned(),
                rpc: "Reload",
                code,
                details,
            })
            .await;
    }
}
