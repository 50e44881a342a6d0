//! Pruning: forgets task queues and workers idle for long.

use super::super::*;

impl Engine {
    /// Drops queues, pollers and dead workers idle for longer than [`FORGET_IDLE_AFTER`] (dead
    /// workers that an open session still names are kept).
    pub(super) fn prune_idle(&self, now: i64) {
        let before = now - FORGET_IDLE_AFTER.as_millis() as i64;
        let hosts: BTreeSet<(String, String)> = self
            .state
            .lock()
            .sessions
            .values()
            .filter_map(|s| s.info.as_ref())
            .map(|i| (i.namespace.clone(), i.worker_identity.clone()))
            .collect();
        let (queues, workers) = self.matcher.prune(before, |namespace, identity| {
            hosts.contains(&(namespace.to_string(), identity.to_string()))
        });
        if queues > 0 || workers > 0 {
            tracing::info!(
                queues,
                workers,
                "forgot idle task queues and long-dead workers"
            );
        }
    }
}
