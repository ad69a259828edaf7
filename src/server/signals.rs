//! SIGTERM and SIGINT, caught from the moment they are installed.

use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct StopSignals(Option<(Signal, Signal)>);

impl StopSignals {
    pub fn install() -> Self {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(terminate), Ok(interrupt)) => Self(Some((terminate, interrupt))),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                Self(None)
            }
        }
    }

    pub async fn wait(self) {
        let Some((mut terminate, mut interrupt)) = self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = terminate.recv() => tracing::info!("received SIGTERM"),
            _ = interrupt.recv() => tracing::info!("received SIGINT"),
        }
    }
}
