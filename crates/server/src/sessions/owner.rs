//! Who a session answers to. A workflow's session is tied to the run that created it: the run
//! hears of its placement and of its end as history events, and the session closes with the
//! run. A client's session is tied to nothing: its client completes it, or its idle timeout
//! does. The owner is kept as text in the session's info (`SessionInfo.owner`), written and
//! read only here.

use tether_core::types::RunId;

/// Who a session answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOwner {
    /// A client, by the name it gave (its identity; may be empty).
    Client(String),
    /// A workflow run, and the sequence number of the command that created the session.
    Workflow {
        /// The run.
        run_id: RunId,
        /// The `CreateSession` command's sequence number (how the run tells its sessions apart).
        seq: u32,
    },
}

/// How a workflow owner begins in its text form, `run:RUN_ID:SEQ`.
const WORKFLOW_PREFIX: &str = "run:";

impl SessionOwner {
    /// The owner of a session a client asks for, by the name the client gives. A name that
    /// reads as a workflow owner is refused: it would tie the session to a run the client
    /// named (the run would hear of it, and end it when it closes).
    pub fn client(name: &str) -> Result<SessionOwner, String> {
        if name.starts_with(WORKFLOW_PREFIX) {
            return Err(format!(
                "session owner {:?} begins with {WORKFLOW_PREFIX:?}, which marks the sessions \
                 workflows create; give the client's own name (or none)",
                tether_core::types::quote_prefix(name, 60)
            ));
        }
        Ok(SessionOwner::Client(name.to_string()))
    }

    /// The owner a stored session's text names. Text that is not a well-formed workflow owner
    /// is a client's name: nothing else was ever written.
    pub fn parse(text: &str) -> SessionOwner {
        let workflow = text
            .strip_prefix(WORKFLOW_PREFIX)
            .and_then(|rest| rest.rsplit_once(':'))
            .and_then(|(run_id, seq)| Some((run_id, seq.parse().ok()?)));
        match workflow {
            Some((run_id, seq)) if !run_id.is_empty() => SessionOwner::Workflow {
                run_id: RunId::new(run_id),
                seq,
            },
            _ => SessionOwner::Client(text.to_string()),
        }
    }

    /// The owning run and the creating command's number, when a workflow owns the session.
    pub fn workflow(&self) -> Option<(&RunId, u32)> {
        match self {
            SessionOwner::Workflow { run_id, seq } => Some((run_id, *seq)),
            SessionOwner::Client(_) => None,
        }
    }
}

impl std::fmt::Display for SessionOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionOwner::Client(name) => f.write_str(name),
            SessionOwner::Workflow { run_id, seq } => {
                write!(f, "{WORKFLOW_PREFIX}{}:{seq}", run_id.as_str())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workflow_owner_reads_back_as_written() {
        let owner = SessionOwner::Workflow {
            run_id: RunId::new("0190-abc"),
            seq: 7,
        };
        let text = owner.to_string();
        assert_eq!(text, "run:0190-abc:7");
        assert_eq!(SessionOwner::parse(&text), owner);
        assert_eq!(
            owner.workflow().map(|(r, s)| (r.as_str(), s)),
            Some(("0190-abc", 7))
        );
    }

    #[test]
    fn anything_else_is_a_clients_name() {
        for text in ["", "laptop-4711", "run:", "run:abc", "run::3", "run:abc:x"] {
            assert_eq!(
                SessionOwner::parse(text),
                SessionOwner::Client(text.into()),
                "{text:?}"
            );
            assert!(SessionOwner::parse(text).workflow().is_none());
        }
    }

    #[test]
    fn a_client_may_not_name_itself_like_a_workflow_run() {
        assert_eq!(
            SessionOwner::client("laptop-4711"),
            Ok(SessionOwner::Client("laptop-4711".into()))
        );
        let refused = SessionOwner::client("run:0190-abc:1").unwrap_err();
        assert!(refused.contains("client's own name"), "{refused}");
        assert!(SessionOwner::client("run:").is_err());
    }
}
