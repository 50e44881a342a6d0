//! Worker identity: which name a worker process registers under, and the proof that no other
//! live process on this host uses the same one.
//!
//! Every worker process holds an exclusive lock on a small file under the state directory
//! (`$TETHER_STATE_DIR`, default `~/.local/state/tether`) for as long as it runs; the kernel
//! drops the lock when the process dies, however it dies. The file is chosen by what the
//! worker *is* (server, namespace, task queue and what it advertises: its inventory's GPUs,
//! host name, labels and resources), so a restarted process finds the same file, takes its lock,
//! and gets its previous identity back, while a second process with another configuration (the
//! A10G inventory next to the A100 one) gets a file, and an identity, of its own. Two processes
//! with the same configuration take the next free slot (`.2`, `.3`, ...): they are
//! interchangeable, so which gets which does not matter.
//!
//! The file also records the instance id of the process that last held it, which the new
//! holder sends as `previous_instance_id`: the server then knows the old process is gone and
//! hands the identity over at once instead of waiting out the liveness timeout.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Most processes with one configuration on one host.
const MAX_SLOTS: usize = 64;

/// The identity a worker process holds while it runs.
#[derive(Debug)]
pub struct IdentityLease {
    /// The identity it registers under.
    pub identity: String,
    /// This process's instance id (random, one per start).
    pub instance_id: String,
    /// The instance that held the identity before, if this host knows one.
    pub previous_instance_id: String,
    /// Held until the lease is dropped (the process ends, or the worker shuts down).
    _lock: Option<File>,
}

/// Why an identity could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Another live process on this host holds the identity.
    #[error(
        "worker identity {identity:?} is in use by another live worker process on this host \
         ({holder}); stop it, or give this worker another identity (WorkerOptions::identity)"
    )]
    InUse {
        /// The identity.
        identity: String,
        /// What its lock file says of the holder.
        holder: String,
    },
}

/// What a worker's identity is derived from.
pub struct IdentityRequest<'a> {
    /// The identity the options set ("" for the default).
    pub explicit: &'a str,
    /// Where lock files live (None: no persistence; the default identity is then random).
    pub state_dir: Option<&'a Path>,
    /// The server the worker talks to, its namespace and task queue.
    pub server: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Task queue.
    pub task_queue: &'a str,
    /// What the worker advertises that tells it apart (see `CapabilitySource::fingerprint`).
    pub fingerprint: &'a str,
    /// The host name to put in the default identity (a declared inventory's, else the host's).
    pub hostname: &'a str,
}

/// The default state directory: `$TETHER_STATE_DIR`, else `~/.local/state/tether`.
pub fn default_state_dir() -> Option<PathBuf> {
    std::env::var_os("TETHER_STATE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state/tether")))
}

/// A stable hex digest (FNV-1a, 64 bits) for file names: the same input gives the same name
/// on every run and every build, which `std`'s hasher does not promise.
fn digest(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Takes the identity for a worker process.
pub fn acquire(req: &IdentityRequest<'_>) -> Result<IdentityLease, IdentityError> {
    let instance_id = uuid::Uuid::new_v4().simple().to_string();
    let Some(dir) = req.state_dir else {
        let identity = if req.explicit.is_empty() {
            format!("{}-{}", req.hostname, &instance_id[..8])
        } else {
            req.explicit.to_string()
        };
        return Ok(IdentityLease {
            identity,
            instance_id,
            previous_instance_id: String::new(),
            _lock: None,
        });
    };
    let workers = dir.join("workers");
    if let Err(e) = std::fs::create_dir_all(&workers) {
        tracing::warn!(path = %workers.display(), error = %e, "could not create the worker state directory; this worker's identity will not survive a restart");
        return acquire(&IdentityRequest {
            state_dir: None,
            ..*req
        });
    }
    if !req.explicit.is_empty() {
        let key = digest(&[req.server, req.namespace, "identity", req.explicit]);
        let path = workers.join(format!("{key}.lock"));
        return match Slot::take(&path) {
            Ok(Some(slot)) => Ok(slot.lease(req.explicit.to_string(), instance_id)),
            Ok(None) => Err(IdentityError::InUse {
                identity: req.explicit.to_string(),
                holder: holder_of(&path),
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not use the identity lock file; two processes with this identity would only be caught by the server");
                Ok(IdentityLease {
                    identity: req.explicit.to_string(),
                    instance_id,
                    previous_instance_id: String::new(),
                    _lock: None,
                })
            }
        };
    }
    let key = digest(&[
        req.server,
        req.namespace,
        "default",
        req.task_queue,
        req.fingerprint,
    ]);
    for slot in 1..=MAX_SLOTS {
        let name = if slot == 1 {
            format!("{key}.lock")
        } else {
            format!("{key}.{slot}.lock")
        };
        let path = workers.join(name);
        match Slot::take(&path) {
            Ok(Some(mut taken)) => {
                let id = match taken.recorded("id").filter(|id| !id.is_empty()) {
                    Some(id) => id,
                    None => uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
                };
                taken.fields.retain(|(k, _)| k != "id");
                taken.fields.push(("id".into(), id.clone()));
                return Ok(taken.lease(format!("{}-{id}", req.hostname), instance_id));
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not use the identity lock file; using a one-off identity");
                break;
            }
        }
    }
    acquire(&IdentityRequest {
        state_dir: None,
        ..*req
    })
}

/// What a lock file says about whoever holds it, for the error.
fn holder_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or("?")
            .to_string()
    };
    format!(
        "pid {}, instance {}, lock file {}",
        field("pid"),
        field("instance"),
        path.display()
    )
}

/// A lock file taken by this process, with the fields it held.
struct Slot {
    file: File,
    fields: Vec<(String, String)>,
}

impl Slot {
    /// Locks `path` (created if needed); None when another process holds it.
    fn take(path: &Path) -> std::io::Result<Option<Slot>> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(Some(Slot { file, fields }))
    }

    fn recorded(&self, name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Records this process as the holder and keeps the lock in the lease.
    fn lease(mut self, identity: String, instance_id: String) -> IdentityLease {
        let previous_instance_id = self.recorded("instance").unwrap_or_default();
        self.fields
            .retain(|(k, _)| !matches!(k.as_str(), "instance" | "pid" | "identity"));
        self.fields.push(("identity".into(), identity.clone()));
        self.fields.push(("instance".into(), instance_id.clone()));
        self.fields
            .push(("pid".into(), std::process::id().to_string()));
        let text: String = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        let written = self
            .file
            .set_len(0)
            .and_then(|_| self.file.rewind())
            .and_then(|_| self.file.write_all(text.as_bytes()))
            .and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not record this worker in its identity lock file");
        }
        IdentityLease {
            identity,
            instance_id,
            previous_instance_id,
            _lock: Some(self.file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(dir: &'a Path, fingerprint: &'a str, explicit: &'a str) -> IdentityRequest<'a> {
        IdentityRequest {
            explicit,
            state_dir: Some(dir),
            server: "http://127.0.0.1:7233",
            namespace: "default",
            task_queue: "gpu",
            fingerprint,
            hostname: "box",
        }
    }

    #[test]
    fn two_live_processes_get_two_identities_and_a_restart_gets_its_own_back() {
        let dir = tempfile::tempdir().unwrap();
        let a100 = acquire(&request(dir.path(), "4xA100", "")).unwrap();
        let a10g = acquire(&request(dir.path(), "2xA10G", "")).unwrap();
        assert_ne!(a100.identity, a10g.identity);
        assert!(a100.identity.starts_with("box-"), "{}", a100.identity);
        // Same configuration twice: interchangeable, but never the same identity.
        let twin = acquire(&request(dir.path(), "4xA100", "")).unwrap();
        assert_ne!(twin.identity, a100.identity);
        // The A100 process restarts: same identity, and it names the instance it replaces.
        let (identity, instance) = (a100.identity.clone(), a100.instance_id.clone());
        drop(a100);
        let again = acquire(&request(dir.path(), "4xA100", "")).unwrap();
        assert_eq!(again.identity, identity);
        assert_eq!(again.previous_instance_id, instance);
        assert_ne!(again.instance_id, instance);
    }

    #[test]
    fn an_explicit_identity_is_held_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(&request(dir.path(), "", "gpu-7")).unwrap();
        assert_eq!(first.identity, "gpu-7");
        let err = acquire(&request(dir.path(), "", "gpu-7")).unwrap_err();
        assert!(err.to_string().contains("gpu-7"), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        let second = acquire(&request(dir.path(), "", "gpu-7")).unwrap();
        assert_eq!(second.identity, "gpu-7");
    }

    #[test]
    fn digests_are_stable() {
        // File names must not change between builds, or restarts would lose identities.
        assert_eq!(digest(&["a", "b"]), digest(&["a", "b"]));
        assert_ne!(digest(&["ab", ""]), digest(&["a", "b"]));
        assert_eq!(digest(&[]), "cbf29ce484222325");
    }
}
