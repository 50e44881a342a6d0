//! Worker settings ([`WorkerOptions`]), checked by one set of rules (at `build`, and again at
//! start), and what a worker can fail with.

use super::identity::{default_state_dir, IdentityError};
use std::time::Duration;

/// Worker settings. Defaults are written on each field.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Task queue to poll. Required.
    pub task_queue: tether_core::types::TaskQueue,
    /// Identity reported to the server. Default (when empty): `HOSTNAME-ID`, where HOSTNAME is
    /// a declared inventory's host name (else the host's) and ID is kept in the state directory
    /// per configuration, so a restarted worker gets its identity (and its sessions) back and
    /// two workers on one host never share one. Whatever it is, one live process holds it at a
    /// time (see the README, "Worker identity").
    pub identity: String,
    /// Where the identity lock files live. Default: `$TETHER_STATE_DIR`, else
    /// `~/.local/state/tether`; None keeps nothing (the default identity is then new each start).
    pub state_dir: Option<std::path::PathBuf>,
    /// Most activities running at once. Default 100; `build` refuses 0, and so does `start`
    /// when activities are registered.
    pub max_concurrent_activities: usize,
    /// Most workflow tasks processed at once. Default 10; `build` refuses 0, and so does
    /// `start` when workflows are registered.
    pub max_concurrent_workflow_tasks: usize,
    /// Most workflow runs kept in the sticky cache. Default 1000.
    pub max_cached_workflows: usize,
    /// On shutdown, how long running activities may finish before they are failed so they retry
    /// elsewhere. Default 10 s.
    pub graceful_shutdown: Duration,
    /// How long each poll waits on the server (capped by the server's own limit; zero means
    /// that limit). Default 60 s.
    pub poll_timeout: Duration,
    /// What this worker advertises. Default: detected (NVML, sysinfo), nothing declared.
    pub capabilities: crate::caps::CapabilitySource,
    /// Most sessions the server places on this worker at once. Default 10; `build` and `start`
    /// refuse 0 (which the server would read as its default).
    pub max_concurrent_sessions: u32,
}

impl WorkerOptions {
    /// Options for a task queue with defaults for everything else.
    pub fn new(task_queue: impl Into<tether_core::types::TaskQueue>) -> Self {
        WorkerOptions {
            task_queue: task_queue.into(),
            identity: String::new(),
            state_dir: default_state_dir(),
            max_concurrent_activities: 100,
            max_concurrent_workflow_tasks: 10,
            max_cached_workflows: 1000,
            graceful_shutdown: Duration::from_secs(10),
            poll_timeout: Duration::from_secs(60),
            capabilities: crate::caps::CapabilitySource::detect(),
            max_concurrent_sessions: 10,
        }
    }

    /// The options, checked: what [`Worker::start`](super::Worker::start) would refuse is
    /// refused here, before anything runs. Settings are checked as for a worker that may run
    /// both workflows and activities, so no slot count may be 0; a task queue or identity
    /// the server would not accept is refused with what is wrong with it.
    ///
    /// ```
    /// use tether_sdk::worker::WorkerOptions;
    /// let options = WorkerOptions::new("gpu-jobs").max_concurrent_activities(4).build();
    /// assert!(options.is_ok());
    /// let refused = WorkerOptions::new("gpu-jobs").max_concurrent_activities(0).build();
    /// assert!(refused.unwrap_err().to_string().contains("max_concurrent_activities is 0"));
    /// ```
    pub fn build(self) -> Result<WorkerOptions, WorkerError> {
        self.check(true, true)?;
        Ok(self)
    }

    /// The one set of rules for options, applied by [`WorkerOptions::build`] and again by
    /// [`Worker::start`](super::Worker::start) (options may be written as a struct literal):
    /// refuses settings under which the worker could never do what it was given (no slots for
    /// the kind of work it has code for: it would poll for nothing, or never poll), slot
    /// counts the server would read as something else, and a malformed task queue or identity.
    pub(super) fn check(
        &self,
        has_workflows: bool,
        has_activities: bool,
    ) -> Result<(), WorkerError> {
        let invalid = |what: String| Err(WorkerError::InvalidOptions(what));
        if has_activities && self.max_concurrent_activities == 0 {
            return invalid(
                "max_concurrent_activities is 0, so the worker would never take one of its \
                 activities; give it at least 1 (default 100)"
                    .into(),
            );
        }
        if has_workflows && self.max_concurrent_workflow_tasks == 0 {
            return invalid(
                "max_concurrent_workflow_tasks is 0, so the worker would never run one of its \
                 workflows; give it at least 1 (default 10)"
                    .into(),
            );
        }
        if self.max_concurrent_sessions == 0 {
            // On the wire 0 means "the server's default", which would place 10 sessions here
            // (a worker with only workflows registered is a candidate too: it polls the queue).
            return invalid(
                "max_concurrent_sessions is 0, which the server would read as its default (10); \
                 give the number of sessions this worker may host at once, at least 1"
                    .into(),
            );
        }
        tether_core::types::validate_name("task queue", &self.task_queue)
            .or_else(|e| invalid(e.to_string()))?;
        if !self.identity.is_empty() {
            tether_core::types::validate_name("identity", &self.identity)
                .or_else(|e| invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// Sets the session slots (at least 1: [`WorkerOptions::build`] refuses 0).
    pub fn max_concurrent_sessions(mut self, n: u32) -> Self {
        self.max_concurrent_sessions = n;
        self
    }

    /// Sets what the worker advertises.
    pub fn capabilities(mut self, caps: crate::caps::CapabilitySource) -> Self {
        self.capabilities = caps;
        self
    }

    /// Sets the identity.
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// Sets where the identity lock files live (None: nowhere).
    pub fn state_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.state_dir = dir;
        self
    }

    /// Sets the activity concurrency (at least 1: [`WorkerOptions::build`] refuses 0).
    pub fn max_concurrent_activities(mut self, n: usize) -> Self {
        self.max_concurrent_activities = n;
        self
    }

    /// Sets the workflow task concurrency (at least 1: [`WorkerOptions::build`] refuses 0).
    pub fn max_concurrent_workflow_tasks(mut self, n: usize) -> Self {
        self.max_concurrent_workflow_tasks = n;
        self
    }

    /// Sets the sticky cache size.
    pub fn max_cached_workflows(mut self, n: usize) -> Self {
        self.max_cached_workflows = n;
        self
    }

    /// Sets the shutdown grace period.
    pub fn graceful_shutdown(mut self, d: Duration) -> Self {
        self.graceful_shutdown = d;
        self
    }

    /// Sets the poll timeout.
    pub fn poll_timeout(mut self, d: Duration) -> Self {
        self.poll_timeout = d;
        self
    }
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Nothing is registered.
    #[error("the worker has no workflows and no activities registered; register at least one")]
    NothingRegistered,
    /// The options are invalid.
    #[error("invalid worker options: {0}")]
    InvalidOptions(String),
    /// Another live process on this host holds the identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> WorkerOptions {
        WorkerOptions::new("q").state_dir(None)
    }

    fn refused(options: WorkerOptions) -> String {
        match options.build() {
            Err(WorkerError::InvalidOptions(why)) => why,
            other => panic!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn build_accepts_the_defaults_and_returns_them_unchanged() {
        let built = options().identity("w-1").build().unwrap();
        assert_eq!(
            (built.task_queue.as_str(), built.identity.as_str()),
            ("q", "w-1")
        );
        assert_eq!(
            (
                built.max_concurrent_activities,
                built.max_concurrent_workflow_tasks,
                built.max_concurrent_sessions
            ),
            (100, 10, 10)
        );
    }

    #[test]
    fn build_refuses_a_zero_slot_count_whichever_way_it_was_set() {
        let zero_activities = refused(options().max_concurrent_activities(0));
        assert!(
            zero_activities.contains("max_concurrent_activities is 0"),
            "{zero_activities}"
        );
        let literal = refused(WorkerOptions {
            max_concurrent_workflow_tasks: 0,
            ..options()
        });
        assert!(
            literal.contains("max_concurrent_workflow_tasks is 0"),
            "{literal}"
        );
        let sessions = refused(options().max_concurrent_sessions(0));
        assert!(
            sessions.contains("max_concurrent_sessions is 0"),
            "{sessions}"
        );
    }

    #[test]
    fn build_refuses_a_task_queue_or_identity_the_server_would_not_take() {
        let empty = refused(WorkerOptions::new("").state_dir(None));
        assert!(empty.contains("task queue"), "{empty}");
        let control = refused(options().identity("bad\nname"));
        assert!(control.contains("identity"), "{control}");
    }
}
