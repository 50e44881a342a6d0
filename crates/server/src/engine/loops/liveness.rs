//! The liveness loop: notices workers that stopped heartbeating, checks sessions, exports gauges and prunes idle queues on its tick.

use super::super::*;

impl Engine {
    /// Marks workers dead when they miss the liveness timeout, until shutdown.
    pub async fn run_liveness(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let timeout = self.config.worker_liveness_timeout;
        let tick = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut last_prune = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            for (namespace, identity) in self.matcher.expire(self.now_ms(), timeout) {
                tracing::warn!(
                    namespace,
                    identity,
                    "worker missed its liveness timeout: marked dead"
                );
            }
            if let Err(e) = self.check_sessions().await {
                tracing::error!(error = %e, "checking sessions failed");
            }
            if self.config.metrics {
                self.export_gauges();
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                self.prune_idle(self.now_ms());
            }
        }
    }
}
