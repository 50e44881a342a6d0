//! The retention loop: purges closed runs past their namespace's retention.

use super::super::*;

impl Engine {
    /// Deletes closed runs past their namespace's retention, every
    /// `retention_sweep_interval`, until shutdown.
    pub async fn run_retention(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.retention_sweep_interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match self.purge_expired(self.now_ms()).await {
                Ok((0, 0)) => {}
                Ok((runs, sessions)) => {
                    tracing::info!(
                        runs,
                        sessions,
                        "deleted closed runs and sessions past their retention"
                    )
                }
                Err(e) => tracing::error!(error = %e, "deleting expired runs and sessions failed"),
            }
        }
    }
}
