//! Session checks: sessions whose worker died, whose GPUs vanished or whose timeouts passed.

use super::super::*;

impl Engine {
    /// Fails sessions whose worker went silent for longer than the session's liveness timeout,
    /// closes client sessions idle past their idle timeout, and retries placing the ones still
    /// waiting.
    pub(super) async fn check_sessions(&self) -> Result<(), EngineError> {
        let now = self.now_ms();
        self.transact(|st, txn| {
            if st.sessions.is_empty() {
                return Ok(());
            }
            let mut silent: Vec<(String, String)> = Vec::new();
            let mut idle: Vec<(String, u64)> = Vec::new();
            for s in st.sessions.values() {
                let Some(info) = s.info.as_ref().filter(|i| sessions::is_in(i, SessionPhase::Open)) else {
                    continue;
                };
                let options = info.options.clone().unwrap_or_default();
                let limit = options.liveness_timeout_ms as i64;
                let seen = self
                    .matcher
                    .last_seen(&info.namespace, &info.worker_identity)
                    .unwrap_or(0)
                    // After a server restart, workers get one liveness timeout to come back.
                    .max(self.started_ms);
                if now - seen > limit {
                    silent.push((
                        info.session_id.clone(),
                        format!(
                            "worker {} stopped heartbeating ({} ms without a heartbeat; liveness timeout {} ms)",
                            info.worker_identity,
                            now - seen,
                            limit
                        ),
                    ));
                    continue;
                }
                let idle_limit = if options.idle_timeout_ms == 0 {
                    DEFAULT_SESSION_IDLE_MS
                } else {
                    options.idle_timeout_ms
                };
                let used = info.last_used_ms.max(self.started_ms);
                if owner_run(info).is_none() && now.saturating_sub(used) > idle_limit as i64
                {
                    idle.push((info.session_id.clone(), idle_limit));
                }
            }
            for (id, reason) in silent {
                self.close_session(st, &SessionId::from(id), SessionEnd::Failed, &reason, true, now, txn);
            }
            if !idle.is_empty() {
                // An activity still running in the session is use: only the truly idle close.
                let busy: BTreeSet<String> = st
                    .runs
                    .values()
                    .flat_map(|e| e.state.activities.values())
                    .filter_map(|a| a.options.as_ref())
                    .map(|o| o.session_id.clone())
                    .filter(|s| !s.is_empty())
                    .collect();
                for (id, idle_limit) in idle {
                    if busy.contains(&id) {
                        if let Some(info) = st.sessions.get_mut(&id).and_then(|s| s.info.as_mut()) {
                            info.last_used_ms = now;
                        }
                        continue;
                    }
                    let reason = format!(
                        "idle: no activity ran in it for {} (its idle timeout); a client's \
                         session ends by itself so its reservation cannot leak",
                        duration_text(idle_limit)
                    );
                    self.close_session(st, &SessionId::from(id), SessionEnd::TimedOut, &reason, true, now, txn);
                }
            }
            self.try_place_pending(st, now, txn);
            Ok(())
        })
        .await
    }
}
