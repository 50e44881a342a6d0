//! The worker registry: registration (one live process per identity), heartbeats, expiry, pruning, and why a task cannot be placed on any worker.

use super::*;

impl Matcher {
    /// Registers a worker unconditionally (benchmarks and tests; the server uses
    /// [`Matcher::register_instance`], which keeps identities to one process).
    pub fn register(
        &self,
        namespace: &str,
        identity: &str,
        caps: Capabilities,
        task_queues: Vec<String>,
        max_sessions: u32,
        now_ms: i64,
    ) {
        let mut st = self.state.lock();
        st.workers.remove(namespace, identity);
        drop(st);
        let _ = self.register_instance(
            Registration {
                namespace: namespace.into(),
                identity: identity.into(),
                caps,
                task_queues,
                max_sessions,
                ..Default::default()
            },
            now_ms,
            Duration::MAX,
        );
    }

    /// Registers a worker process. Refused (with a description of the holder) while another
    /// live process holds the identity: alive, seen within `liveness`, and not the instance
    /// the registration says it replaces.
    pub fn register_instance(
        &self,
        r: Registration,
        now_ms: i64,
        liveness: Duration,
    ) -> Result<Registered, String> {
        let mut st = self.state.lock();
        let outcome = match st.workers.get(&r.namespace, &r.identity) {
            None => Registered::New,
            Some(w) if w.instance_id == r.instance_id => Registered::Again,
            Some(w) => {
                let silent_ms = now_ms.saturating_sub(w.last_seen_ms);
                let live = w.alive && (silent_ms as u128) <= liveness.as_millis();
                let replaces =
                    !r.previous_instance_id.is_empty() && r.previous_instance_id == w.instance_id;
                if live && !replaces {
                    let host = w
                        .caps
                        .host
                        .as_ref()
                        .map(|h| h.hostname.as_str())
                        .filter(|h| !h.is_empty())
                        .unwrap_or("an unknown host");
                    return Err(format!(
                        "worker identity {:?} is held by a live worker process (instance {}, \
                         pid {} on {host}, last seen {} ms ago); stop that process, or give \
                         this worker another identity",
                        r.identity, w.instance_id, w.pid, silent_ms
                    ));
                }
                Registered::Replaced {
                    previous: w.instance_id.clone(),
                    previous_draining: w.stopped && !replaces,
                }
            }
        };
        if let Registered::Replaced { previous, .. } = &outcome {
            // The replaced process's parked polls end now (empty): work under this identity
            // is for the new process, and their next call is refused.
            let (identity, previous) = (r.identity.as_str(), previous.as_str());
            for (key, queue) in st.queues.iter_mut() {
                if key.namespace != r.namespace {
                    continue;
                }
                queue.waiting.retain(|w| {
                    let theirs = w.identity == identity && w.instance == previous;
                    if theirs {
                        w.tx.lock().take();
                    }
                    !theirs
                });
            }
        }
        st.workers.insert(WorkerRecord {
            namespace: r.namespace,
            identity: r.identity.clone(),
            caps: Arc::new(r.caps),
            task_queues: r.task_queues,
            registered_ms: now_ms,
            last_seen_ms: now_ms,
            alive: true,
            stopped: false,
            stop_reason: String::new(),
            instance_id: r.instance_id,
            pid: r.pid,
            max_sessions: r.max_sessions,
            class_cache: HashMap::new(),
            evaluated: 0,
            eligible: Vec::new(),
        });
        Ok(outcome)
    }

    /// Marks a worker stopped (it shut down): it gets nothing more until it registers again,
    /// and the polls that process has parked are answered empty at once. A stopping worker
    /// waits for its in-flight polls rather than dropping them, for a poll dropped after the
    /// server handed it a task would leave that task started on a worker that never saw it;
    /// this is what lets it wait without waiting a whole poll timeout. (A poll already claimed
    /// for a task still gets it, and the worker runs it in its grace period.)
    /// False when the identity is unknown or held by another instance.
    pub fn deregister(
        &self,
        namespace: &str,
        identity: &str,
        instance: &str,
        reason: &str,
    ) -> bool {
        let mut st = self.state.lock();
        // The process's polls end even when its registration is unknown here (a server that
        // restarted since): it is stopping either way, and waits for them.
        for (_, queue) in st
            .queues
            .iter_mut()
            .filter(|(key, _)| key.namespace == namespace)
        {
            queue.waiting.retain(|waiter| {
                let theirs = waiter.identity == identity && waiter.instance == instance;
                if theirs {
                    // Its poll sees the sender gone and answers empty.
                    waiter.tx.lock().take();
                }
                !theirs
            });
        }
        let Some(w) = st.workers.get_mut(namespace, identity) else {
            return false;
        };
        if w.instance_id != instance {
            return false;
        }
        w.alive = false;
        w.stopped = true;
        w.stop_reason = reason.to_string();
        true
    }

    /// Whether process `instance` may take work under `identity`: it holds it, or nobody has
    /// registered it (a worker that polls before it registers, as after a server restart).
    pub fn may_hold(&self, namespace: &str, identity: &str, instance: &str) -> bool {
        let st = self.state.lock();
        st.workers
            .get(namespace, identity)
            .is_none_or(|w| w.instance_id == instance)
    }

    /// The instance that holds a registered identity, if any.
    pub fn instance_of(&self, namespace: &str, identity: &str) -> Option<String> {
        self.state
            .lock()
            .workers
            .get(namespace, identity)
            .map(|w| w.instance_id.clone())
    }

    /// Records a heartbeat; new capabilities replace the old ones (and invalidate the cache).
    /// Returns false when the worker is not registered.
    pub fn heartbeat(
        &self,
        namespace: &str,
        identity: &str,
        caps: Option<Capabilities>,
        now_ms: i64,
    ) -> bool {
        let mut st = self.state.lock();
        let Some(w) = st.workers.get_mut(namespace, identity) else {
            return false;
        };
        if w.stopped {
            // A stopped worker registers again to come back.
            return false;
        }
        w.last_seen_ms = now_ms;
        let revived = !w.alive;
        w.alive = true;
        let mut changed = false;
        if let Some(caps) = caps {
            if *w.caps != caps {
                w.caps = Arc::new(caps);
                w.forget_classes();
                changed = true;
            }
        }
        if changed || revived {
            Self::rematch(&mut st, namespace, identity);
        }
        true
    }

    /// Marks workers dead that were not seen within `timeout`; returns their identities.
    pub fn expire(&self, now_ms: i64, timeout: Duration) -> Vec<(String, String)> {
        let mut st = self.state.lock();
        let mut dead = Vec::new();
        for w in st.workers.values_mut() {
            if w.alive && now_ms - w.last_seen_ms > timeout.as_millis() as i64 {
                w.alive = false;
                dead.push((w.namespace.clone(), w.identity.clone()));
            }
        }
        dead
    }

    /// Forgets what only a long-gone worker would use: pollers not seen since `before_ms`,
    /// queues left with no task, no parked poll and no recent poller (each worker start makes a
    /// new sticky queue, so without this they pile up), and dead workers not seen since
    /// `before_ms` unless `in_use` says something still refers to them. Returns how many queues
    /// and workers were dropped.
    pub fn prune(&self, before_ms: i64, in_use: impl Fn(&str, &str) -> bool) -> (usize, usize) {
        let mut st = self.state.lock();
        let queues_before = st.queues.len();
        st.queues.retain(|_, q| {
            q.pollers.retain(|_, seen| *seen >= before_ms);
            q.waiting.retain(|w| !w.is_closed());
            q.by_class.retain(|_, tasks| !tasks.is_empty());
            q.len > 0 || !q.waiting.is_empty() || !q.pollers.is_empty()
        });
        let workers_before = st.workers.len();
        st.workers.retain(|w| {
            w.alive || w.last_seen_ms >= before_ms || in_use(&w.namespace, &w.identity)
        });
        (
            queues_before - st.queues.len(),
            workers_before - st.workers.len(),
        )
    }

    /// (namespace, alive) → how many registered workers.
    pub fn worker_counts(&self) -> HashMap<(String, bool), usize> {
        let st = self.state.lock();
        let mut counts = HashMap::new();
        for w in st.workers.values() {
            *counts.entry((w.namespace.clone(), w.alive)).or_default() += 1;
        }
        counts
    }

    /// Registered workers of a namespace.
    pub fn workers_in(&self, namespace: &str) -> Vec<WorkerRecord> {
        let st = self.state.lock();
        let mut out: Vec<WorkerRecord> = st.workers.in_namespace(namespace).cloned().collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// When a registered worker was last heard from (without copying its record, which holds
    /// its whole class cache: the session liveness check asks for every open session).
    pub fn last_seen(&self, namespace: &str, identity: &str) -> Option<i64> {
        self.state
            .lock()
            .workers
            .get(namespace, identity)
            .map(|w| w.last_seen_ms)
    }

    /// One registered worker.
    pub fn worker(&self, namespace: &str, identity: &str) -> Option<WorkerRecord> {
        self.state.lock().workers.get(namespace, identity).cloned()
    }

    /// Why work just put on `queue` waits instead of being taken: no live worker satisfies its
    /// requirements, or none polls the queue at all ("" when a live worker can take it).
    pub fn placement_note(
        &self,
        namespace: &str,
        queue: &str,
        requirements: &str,
        now_ms: i64,
        liveness: Duration,
    ) -> String {
        if !requirements.is_empty() {
            let explained = self.explain(namespace, queue, requirements);
            if !explained.is_empty() {
                return explained;
            }
        }
        let st = self.state.lock();
        let key = QueueKey::new(namespace, queue, TaskKind::Activity);
        let live_poller = st.queues.get(&key).is_some_and(|q| {
            q.pollers.iter().any(|(identity, seen)| {
                let recent = (now_ms.saturating_sub(*seen) as u128) <= liveness.as_millis();
                let registered = st.workers.get(namespace, identity);
                recent && registered.is_none_or(|w| w.alive)
            })
        });
        if live_poller {
            String::new()
        } else {
            format!(
                "no live worker polls task queue {queue:?}; the activity waits until one does \
                 (or until its schedule-to-start timeout, if it has one)"
            )
        }
    }

    /// Why no live worker of `namespace` polling `queue` can take work with `requirements`
    /// ("" when one can).
    pub fn explain(&self, namespace: &str, queue: &str, requirements: &str) -> String {
        let Ok(reqs) = Requirements::parse(requirements) else {
            return String::new();
        };
        if reqs.hard.is_empty() {
            return String::new();
        }
        let st = self.state.lock();
        let live: Vec<&WorkerRecord> = st
            .workers
            .in_namespace(namespace)
            .filter(|w| w.alive)
            .collect();
        let on_queue: Vec<&WorkerRecord> = live
            .iter()
            .copied()
            .filter(|w| {
                w.task_queues.iter().any(|q| q == queue) || queue == host_queue_name(&w.identity)
            })
            .collect();
        let pool = if on_queue.is_empty() { live } else { on_queue };
        reqs.explain(pool.iter().map(|w| (w.identity.as_str(), w.caps.as_ref())))
    }
}
