//! The sticky cache: workflow instances kept between tasks, least recently used evicted first.

use crate::workflow::WorkflowInstance;
use std::collections::HashMap;

/// A small LRU of workflow instances by run id.
pub(super) struct Cache {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (u64, WorkflowInstance)>,
}

impl Cache {
    pub(super) fn new(capacity: usize) -> Self {
        Cache {
            capacity,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    pub(super) fn take(&mut self, run_id: &str) -> Option<WorkflowInstance> {
        self.entries.remove(run_id).map(|(_, i)| i)
    }

    pub(super) fn put(&mut self, run_id: String, instance: WorkflowInstance) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        self.entries.insert(run_id, (self.tick, instance));
    }
}
