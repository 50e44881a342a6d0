//! Gauges: the engine's state as metrics, exported on the liveness tick.

use super::super::*;

impl Engine {
    /// Sets the gauges: open runs, sessions, workers and backlogs. Every namespace gets every
    /// series (0 when there is nothing), so a value never lingers after its last run closed.
    pub(super) fn export_gauges(&self) {
        let mut runs: HashMap<(String, bool), usize> = HashMap::new();
        let mut sessions: HashMap<(String, String), usize> = HashMap::new();
        let namespaces: Vec<String> = {
            let st = self.state.lock();
            for entry in st.runs.values().filter(|e| e.is_open()) {
                *runs
                    .entry((
                        entry.state.namespace.clone(),
                        entry.state.standalone_activity,
                    ))
                    .or_default() += 1;
            }
            for info in st.sessions.values().filter_map(|s| s.info.as_ref()) {
                *sessions
                    .entry((info.namespace.clone(), info.state.clone()))
                    .or_default() += 1;
            }
            st.namespaces.keys().cloned().collect()
        };
        let workers = self.matcher.worker_counts();
        for ns in namespaces {
            for (standalone, kind) in [(false, "workflow"), (true, "activity")] {
                let n = runs.get(&(ns.clone(), standalone)).copied().unwrap_or(0);
                metrics::gauge!("tether_runs_open", "namespace" => ns.clone(), "kind" => kind)
                    .set(n as f64);
            }
            for state in [SessionPhase::Creating.name(), SessionPhase::Open.name()] {
                let n = sessions
                    .get(&(ns.clone(), state.to_string()))
                    .copied()
                    .unwrap_or(0);
                metrics::gauge!("tether_sessions", "namespace" => ns.clone(), "state" => state)
                    .set(n as f64);
            }
            for (alive, state) in [(true, "alive"), (false, "dead")] {
                let n = workers.get(&(ns.clone(), alive)).copied().unwrap_or(0);
                metrics::gauge!("tether_workers", "namespace" => ns.clone(), "state" => state)
                    .set(n as f64);
            }
        }
        for (key, len) in self.matcher.backlogs() {
            metrics::gauge!(
                "tether_task_queue_backlog",
                "namespace" => key.namespace,
                "queue" => key.queue,
                "kind" => key.kind.name()
            )
            .set(len as f64);
        }
    }
}
