//! A session's life as a typed state machine: creating → open → completed, failed, timed out or
//! terminated. The wire and the store keep the phase's name (`SessionInfo.state`); the engine
//! reads it through [`SessionPhase::of`] and changes it only through the transitions here,
//! which do no I/O and say what the engine must do about the change.

use tether_wire::pb;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionPhase {
    /// Waiting for a worker that can host it.
    Creating,
    /// Placed: a worker and its resources are reserved for it.
    Open,
    /// Completed by its owner (or released when its owner run closed).
    Completed,
    /// Its worker died, lost its GPUs, or no worker could host it in time.
    Failed,
    /// Unused for longer than its idle timeout.
    TimedOut,
    /// Ended by an operator.
    Terminated,
}

/// How a live session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Its owner is done with it.
    Completed,
    /// It can no longer run anything.
    Failed,
    /// It went unused past its idle timeout.
    TimedOut,
    /// An operator ended it.
    Terminated,
}

/// What ending a session asks of the engine, from the phase it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    /// The phase it is in now.
    pub phase: SessionPhase,
    /// It held a reservation, which is freed.
    pub release_reservation: bool,
    /// What its owner is told.
    pub tell_owner: OwnerNotice,
}

/// What a session's owner learns when the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerNotice {
    /// Its request for a session failed (the session was never placed).
    CreationFailed,
    /// The session it held ended without the owner completing it.
    Ended,
    /// Nothing: the owner completed it (or it ended some other way the owner caused).
    Nothing,
}

/// A transition asked of a session that is not in a phase that allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotLive(pub SessionPhase);

impl SessionPhase {
    /// Every phase, in the order of a session's life.
    pub const ALL: [SessionPhase; 6] = [
        SessionPhase::Creating,
        SessionPhase::Open,
        SessionPhase::Completed,
        SessionPhase::Failed,
        SessionPhase::TimedOut,
        SessionPhase::Terminated,
    ];

    /// The name the wire and the store use.
    pub fn name(self) -> &'static str {
        match self {
            SessionPhase::Creating => "creating",
            SessionPhase::Open => "open",
            SessionPhase::Completed => "completed",
            SessionPhase::Failed => "failed",
            SessionPhase::TimedOut => "timed_out",
            SessionPhase::Terminated => "terminated",
        }
    }

    /// The phase of that name.
    pub fn parse(name: &str) -> Option<SessionPhase> {
        SessionPhase::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The phase a session's info records (None for a name this version does not know).
    pub fn of(info: &pb::SessionInfo) -> Option<SessionPhase> {
        SessionPhase::parse(&info.state)
    }

    /// Creating or open: it holds (or waits for) a worker.
    pub fn is_live(self) -> bool {
        matches!(self, SessionPhase::Creating | SessionPhase::Open)
    }

    /// Creating → open, once a worker is reserved for it.
    pub fn place(self) -> Result<SessionPhase, NotLive> {
        match self {
            SessionPhase::Creating => Ok(SessionPhase::Open),
            other => Err(NotLive(other)),
        }
    }

    /// A live session ends `how`: its new phase and what must follow.
    pub fn end(self, how: SessionEnd) -> Result<Ending, NotLive> {
        let phase = match how {
            SessionEnd::Completed => SessionPhase::Completed,
            SessionEnd::Failed => SessionPhase::Failed,
            SessionEnd::TimedOut => SessionPhase::TimedOut,
            SessionEnd::Terminated => SessionPhase::Terminated,
        };
        match self {
            SessionPhase::Creating => Ok(Ending {
                phase,
                release_reservation: false,
                tell_owner: OwnerNotice::CreationFailed,
            }),
            SessionPhase::Open => Ok(Ending {
                phase,
                release_reservation: true,
                tell_owner: if how == SessionEnd::Completed {
                    OwnerNotice::Nothing
                } else {
                    OwnerNotice::Ended
                },
            }),
            closed => Err(NotLive(closed)),
        }
    }
}

/// Whether a session's info records a live phase (creating or open). (Compares names: it is
/// asked on every hand-out in a session.)
pub fn is_live(info: &pb::SessionInfo) -> bool {
    is_in(info, SessionPhase::Open) || is_in(info, SessionPhase::Creating)
}

/// Whether a session's info records the phase `phase`.
pub fn is_in(info: &pb::SessionInfo, phase: SessionPhase) -> bool {
    info.state == phase.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_no_phase() {
        for p in SessionPhase::ALL {
            assert_eq!(SessionPhase::parse(p.name()), Some(p));
        }
        assert_eq!(SessionPhase::parse("opened"), None);
        assert_eq!(SessionPhase::parse(""), None);
    }

    #[test]
    fn only_a_creating_session_can_be_placed() {
        assert_eq!(SessionPhase::Creating.place(), Ok(SessionPhase::Open));
        for p in SessionPhase::ALL.into_iter().skip(1) {
            assert_eq!(p.place(), Err(NotLive(p)), "{p:?}");
        }
    }

    #[test]
    fn ending_frees_a_reservation_only_when_one_is_held_and_tells_the_owner_what_it_must_know() {
        let e = SessionPhase::Open.end(SessionEnd::Failed).unwrap();
        assert_eq!(
            e,
            Ending {
                phase: SessionPhase::Failed,
                release_reservation: true,
                tell_owner: OwnerNotice::Ended
            }
        );
        let e = SessionPhase::Open.end(SessionEnd::Completed).unwrap();
        assert_eq!(
            (e.release_reservation, e.tell_owner),
            (true, OwnerNotice::Nothing)
        );
        let e = SessionPhase::Creating.end(SessionEnd::Completed).unwrap();
        assert_eq!(
            (e.phase, e.release_reservation, e.tell_owner),
            (SessionPhase::Completed, false, OwnerNotice::CreationFailed)
        );
    }

    #[test]
    fn the_name_checks_agree_with_the_phase() {
        for p in SessionPhase::ALL {
            let info = pb::SessionInfo {
                state: p.name().into(),
                ..Default::default()
            };
            assert_eq!(is_live(&info), p.is_live(), "{p:?}");
            assert!(SessionPhase::ALL
                .iter()
                .all(|q| is_in(&info, *q) == (*q == p)));
        }
        let unknown = pb::SessionInfo {
            state: "opened".into(),
            ..Default::default()
        };
        assert!(!is_live(&unknown) && SessionPhase::of(&unknown).is_none());
    }

    #[test]
    fn a_closed_session_cannot_end_again() {
        for p in SessionPhase::ALL.into_iter().filter(|p| !p.is_live()) {
            for how in [
                SessionEnd::Completed,
                SessionEnd::Failed,
                SessionEnd::TimedOut,
                SessionEnd::Terminated,
            ] {
                assert_eq!(p.end(how), Err(NotLive(p)), "{p:?} {how:?}");
            }
        }
    }
}
