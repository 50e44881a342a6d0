//! Queues: tasks offered (straight to a parked poll that can take them, or into their requirement class), polls parked and handed over, tasks taken and put back, and what a queue holds.

use super::*;

impl Matcher {
    /// Offers a task with its (canonical) requirements: to the best parked poll that can take it,
    /// otherwise to the backlog.
    pub fn add(&self, key: &QueueKey, task: TaskRef, requirements: &str) {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        Self::offer(&mut st, key, task, class, false)
    }

    /// Takes the parked poll that a task with `requirements` would be handed to (the best
    /// eligible one) off its queues, without handing anything over yet: the caller dispatches
    /// the task to it inside its transaction and hands the result over after the commit.
    pub fn claim_waiter(&self, key: &QueueKey, requirements: &str) -> Option<ClaimedPoll> {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        Self::claim_locked(&mut st, key, class)
    }

    /// Like [`Matcher::claim_waiter`], and when no parked poll can take the task, puts it in
    /// the backlog (one lock, one look at the waiting polls). Only for tasks whose every
    /// hand-out is made durable before the worker sees it (activity attempts): such a task may
    /// be visible before the transaction that created it commits, since its hand-out commits
    /// after it.
    pub fn claim_or_enqueue(
        &self,
        key: &QueueKey,
        task: TaskRef,
        requirements: &str,
    ) -> Option<(ClaimedPoll, TaskRef)> {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        match Self::claim_locked(&mut st, key, class) {
            Some(claimed) => Some((claimed, task)),
            None => {
                Self::offer(&mut st, key, task, class, false);
                None
            }
        }
    }

    pub(super) fn claim_locked(
        st: &mut State,
        key: &QueueKey,
        class: ClassId,
    ) -> Option<ClaimedPoll> {
        loop {
            let index = Self::best_waiter(st, key, class)?;
            let queue = st.queues.get_mut(key).expect("queue exists");
            let waiter = queue.waiting.remove(index).expect("index valid");
            let sender = waiter.tx.lock().take();
            if let Some(sender) = sender.filter(|s| !s.is_closed()) {
                return Some(ClaimedPoll {
                    identity: waiter.identity,
                    instance: waiter.instance,
                    key: key.clone(),
                    class,
                    sender,
                    shared: waiter.tx,
                });
            }
        }
    }

    /// Puts a claimed poll back on its queue (its task turned out to be stale).
    pub fn unclaim(&self, claimed: ClaimedPoll) {
        let mut st = self.state.lock();
        *claimed.shared.lock() = Some(claimed.sender);
        let queue = st.queues.entry(claimed.key).or_default();
        queue.waiting.push_front(Waiter {
            identity: claimed.identity,
            instance: claimed.instance,
            tx: claimed.shared,
        });
    }

    /// Records an attempt handed to a poll (or caller) that ended before taking it.
    pub fn give_back(&self, response: Box<tether_wire::pb::PollActivityTaskResponse>) {
        self.returned.lock().push(*response);
        self.returned_notify.notify_one();
    }

    /// Takes the attempts given back so far, without waiting.
    pub fn take_returned(&self) -> Vec<tether_wire::pb::PollActivityTaskResponse> {
        std::mem::take(&mut *self.returned.lock())
    }

    /// Waits for attempts handed to polls that ended before taking them, and takes them.
    pub async fn returned(&self) -> Vec<tether_wire::pb::PollActivityTaskResponse> {
        loop {
            let taken = self.take_returned();
            if !taken.is_empty() {
                return taken;
            }
            self.returned_notify.notified().await;
        }
    }

    /// Index of the parked poll a task of `class` goes to: the first eligible one, or the
    /// best-scoring one when the class has preferences.
    pub(super) fn best_waiter(st: &mut State, key: &QueueKey, class: ClassId) -> Option<usize> {
        let has_preferences = !st.classes[class].reqs.soft.is_empty();
        let candidates: Vec<(usize, String)> = match st.queues.get(key) {
            Some(q) if !q.waiting.is_empty() => q
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.is_closed())
                .map(|(i, w)| (i, w.identity.clone()))
                .collect(),
            _ => return None,
        };
        let mut chosen: Option<(usize, u64)> = None;
        for (i, identity) in candidates {
            if let Some(score) = st.eligibility(&key.namespace, &identity, class) {
                if chosen.is_none_or(|(_, best)| score > best) {
                    chosen = Some((i, score));
                }
                if !has_preferences {
                    break;
                }
            }
        }
        chosen.map(|(i, _)| i)
    }

    pub(super) fn offer(
        st: &mut State,
        key: &QueueKey,
        task: TaskRef,
        class: ClassId,
        front: bool,
    ) {
        let mut task = task;
        while let Some(index) = Self::best_waiter(st, key, class) {
            let queue = st.queues.get_mut(key).expect("queue exists");
            let waiter = queue.waiting.remove(index).expect("index valid");
            // None: another queue of the same poll handed it something a moment ago.
            let Some(sender) = waiter.tx.lock().take() else {
                continue;
            };
            match sender.send((Handover::Task(task), class, key.clone())) {
                Ok(()) => return,
                Err((Handover::Task(returned), _, _)) => task = returned,
                Err(_) => unreachable!("sent a task"),
            }
        }
        let seq = if front {
            st.front_seq -= 1;
            st.front_seq
        } else {
            st.next_seq += 1;
            st.next_seq
        };
        let queue = st.queues.entry(key.clone()).or_default();
        let deque = queue.by_class.entry(class).or_default();
        if front {
            if let Some((old, _)) = deque.front() {
                queue.fronts.remove(old);
            }
            deque.push_front((seq, task));
            queue.fronts.insert(seq, class);
        } else {
            deque.push_back((seq, task));
            if deque.len() == 1 {
                queue.fronts.insert(seq, class);
            }
        }
        queue.len += 1;
    }

    /// Takes the oldest task this worker can run, without waiting.
    pub fn try_take(&self, key: &QueueKey, identity: &str, now_ms: i64) -> Option<TaskRef> {
        let mut st = self.state.lock();
        Self::touch(&mut st, key, identity, now_ms);
        Self::take_locked(&mut st, key, identity).map(|(task, _)| task)
    }

    /// Puts a task taken with [`Matcher::try_take`] back at the head of its queue (it could not
    /// be dispatched after all).
    pub fn put_back(&self, key: &QueueKey, task: TaskRef, requirements: &str) {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        Self::offer(&mut st, key, task, class, true)
    }

    pub(super) fn touch(st: &mut State, key: &QueueKey, identity: &str, now_ms: i64) {
        if identity.is_empty() {
            return;
        }
        let queue = st.queues.entry(key.clone()).or_default();
        match queue.pollers.get_mut(identity) {
            Some(seen) => *seen = now_ms,
            None => {
                queue.pollers.insert(identity.to_string(), now_ms);
            }
        }
        // A poll is a sign of life (of the process that holds the identity: the engine refuses
        // polls from any other before they get here), but a stopped worker stays stopped.
        if let Some(w) = st.workers.get_mut(&key.namespace, identity) {
            if !w.stopped {
                w.last_seen_ms = now_ms;
                w.alive = true;
            }
        }
    }

    pub(super) fn take_locked(
        st: &mut State,
        key: &QueueKey,
        identity: &str,
    ) -> Option<(TaskRef, ClassId)> {
        let State {
            queues,
            workers,
            classes,
            ..
        } = st;
        let queue = queues.get_mut(key)?;
        if queue.len == 0 {
            return None;
        }
        let worker = workers.get_mut(&key.namespace, identity);
        // The oldest task among the classes this worker satisfies. Walk whichever is shorter:
        // the worker's eligible classes, or the queue's non-empty classes in arrival order.
        let (seq, class) = match worker {
            None => {
                // Unregistered pollers know no capabilities: only work without requirements.
                let (seq, _) = queue.by_class.get(&0)?.front()?;
                (*seq, 0)
            }
            Some(w) if !w.alive => return None,
            Some(w) => {
                w.catch_up(classes);
                if w.eligible.len() < queue.fronts.len() {
                    w.eligible
                        .iter()
                        .filter_map(|c| queue.by_class.get(c)?.front().map(|(s, _)| (*s, *c)))
                        .min()?
                } else {
                    queue
                        .fronts
                        .iter()
                        .find(|(_, c)| w.class_cache.get(c).copied().flatten().is_some())
                        .map(|(s, c)| (*s, *c))?
                }
            }
        };
        queue.fronts.remove(&seq);
        let deque = queue.by_class.get_mut(&class).expect("class deque");
        let (_, task) = deque.pop_front().expect("front exists");
        if let Some((next, _)) = deque.front() {
            queue.fronts.insert(*next, class);
        }
        queue.len -= 1;
        Some((task, class))
    }

    /// After a worker's capabilities changed, hands its parked polls any waiting task it can now
    /// take (otherwise those tasks would wait until one of its polls returned).
    pub(super) fn rematch(st: &mut State, namespace: &str, identity: &str) {
        let keys: Vec<QueueKey> = st
            .queues
            .iter()
            .filter(|(k, q)| {
                k.namespace == namespace
                    && q.len > 0
                    && q.waiting.iter().any(|w| w.identity == identity)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            loop {
                let queue = st.queues.get_mut(&key).expect("listed");
                queue.waiting.retain(|w| !w.is_closed());
                let Some(index) = queue.waiting.iter().position(|w| w.identity == identity) else {
                    break;
                };
                let Some((task, class)) = Self::take_locked(st, &key, identity) else {
                    break;
                };
                let queue = st.queues.get_mut(&key).expect("listed");
                let waiter = queue.waiting.remove(index).expect("found");
                let sender = waiter.tx.lock().take();
                let sent = match sender {
                    Some(s) => {
                        s.send((Handover::Task(task), class, key.clone()))
                            .map_err(|(t, c, _)| match t {
                                Handover::Task(t) => (t, c),
                                Handover::Dispatched(_) => unreachable!("sent a task"),
                            })
                    }
                    None => Err((task, class)),
                };
                if let Err((task, class)) = sent {
                    Self::offer(st, &key, task, class, true);
                }
            }
        }
    }

    /// Takes the oldest task this worker can run, waiting up to `timeout` for one.
    pub async fn poll(
        &self,
        key: &QueueKey,
        identity: &str,
        now_ms: i64,
        timeout: Duration,
    ) -> Option<Handover> {
        self.poll_many(std::slice::from_ref(key), identity, "", now_ms, timeout)
            .await
            .map(|(task, _)| task)
    }

    /// Like [`Matcher::poll`] over several queues at once (the earlier ones are tried first),
    /// for process `instance`; returns what it got and the queue it came from.
    pub async fn poll_many(
        &self,
        keys: &[QueueKey],
        identity: &str,
        instance: &str,
        now_ms: i64,
        timeout: Duration,
    ) -> Option<(Handover, QueueKey)> {
        let rx = {
            let mut st = self.state.lock();
            for key in keys {
                Self::touch(&mut st, key, identity, now_ms);
            }
            for key in keys {
                if let Some((task, _)) = Self::take_locked(&mut st, key, identity) {
                    return Some((Handover::Task(task), key.clone()));
                }
            }
            if timeout.is_zero() {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            let shared: SharedSender = Arc::new(parking_lot::Mutex::new(Some(tx)));
            for key in keys {
                let queue = st.queues.entry(key.clone()).or_default();
                // Parked polls whose callers left are dropped here so the list cannot grow.
                if queue.waiting.len() >= 64 {
                    queue.waiting.retain(|w| !w.is_closed());
                }
                queue.waiting.push_back(Waiter {
                    identity: identity.to_string(),
                    instance: instance.to_string(),
                    tx: shared.clone(),
                });
            }
            rx
        };
        let mut parked = ParkedPoll {
            rx: Some(rx),
            matcher: self,
        };
        let rx = parked.rx.as_mut().expect("just set");
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok((task, _, key))) => {
                parked.rx = None;
                Some((task, key))
            }
            _ => None,
        }
    }

    /// Backlog, pollers and classes of one queue.
    pub fn stats(&self, key: &QueueKey) -> QueueStats {
        let st = self.state.lock();
        match st.queues.get(key) {
            None => QueueStats::default(),
            Some(q) => QueueStats {
                backlog: q.len,
                pollers: q.pollers.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                classes: q
                    .by_class
                    .iter()
                    .filter(|(_, d)| !d.is_empty())
                    .map(|(c, d)| (st.classes[*c].text.clone(), d.len()))
                    .collect(),
            },
        }
    }

    /// Every (identity, queue, kind, last poll) seen in a namespace.
    pub fn pollers_in(&self, namespace: &str) -> Vec<(String, String, TaskKind, i64)> {
        let st = self.state.lock();
        let mut out = Vec::new();
        for (key, q) in st.queues.iter() {
            if key.namespace != namespace {
                continue;
            }
            for (identity, seen) in &q.pollers {
                out.push((identity.clone(), key.queue.clone(), key.kind, *seen));
            }
        }
        out
    }

    // ------------------------------------------------------------------------------------------
    // Worker registry
    // ------------------------------------------------------------------------------------------

    /// Tasks waiting per queue (sticky queues left out: one per worker, and their backlog is
    /// the workflow's own business).
    pub fn backlogs(&self) -> Vec<(QueueKey, usize)> {
        let st = self.state.lock();
        st.queues
            .iter()
            .filter(|(k, _)| !k.queue.starts_with(tether_wire::STICKY_QUEUE_PREFIX))
            .map(|(k, q)| (k.clone(), q.len))
            .collect()
    }
}
