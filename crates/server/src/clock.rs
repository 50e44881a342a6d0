//! The engine's time. Every timestamp the engine records and every deadline it arms is read
//! from one [`Clock`], so a test can run the engine on tokio's paused time: a session's
//! creation timeout of a minute then passes in no real time at all, and nothing in the test
//! sleeps in the hope that something happened meanwhile.

use std::sync::Arc;

/// Milliseconds since the Unix epoch, from the source the server was configured with.
#[derive(Clone, Default)]
pub struct Clock {
    source: Source,
}

#[derive(Clone, Default)]
enum Source {
    /// The system's wall clock (what a server runs on).
    #[default]
    System,
    /// Wall-clock time at the start, then moving only as tokio's clock moves.
    Tokio(Arc<TokioOrigin>),
}

struct TokioOrigin {
    epoch_ms: i64,
    at: tokio::time::Instant,
}

impl Clock {
    /// The system's wall clock: the default, and what `tether server` uses.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Starts at the wall-clock time of now and from then on follows tokio's clock, which
    /// under `tokio::time::pause` (or `#[tokio::test(start_paused = true)]`) stands still until
    /// `tokio::time::advance`, or jumps to the next timer when every task is idle. The engine's
    /// sleeps are tokio's too, so timers and timeouts fire as the paused time reaches them.
    /// Call it inside the runtime whose time it should follow.
    pub fn following_tokio() -> Clock {
        Clock {
            source: Source::Tokio(Arc::new(TokioOrigin {
                epoch_ms: tether_wire::now_ms(),
                at: tokio::time::Instant::now(),
            })),
        }
    }

    /// The time now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.source {
            Source::System => tether_wire::now_ms(),
            Source::Tokio(origin) => {
                origin.epoch_ms + origin.at.elapsed().as_millis().min(i64::MAX as u128) as i64
            }
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.source {
            Source::System => "Clock::system",
            Source::Tokio(_) => "Clock::following_tokio",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_clock_following_tokio_moves_only_with_tokio_time() {
        let clock = Clock::following_tokio();
        let start = clock.now_ms();
        assert!(
            (start - tether_wire::now_ms()).abs() < 60_000,
            "starts at wall time"
        );
        assert_eq!(clock.now_ms(), start, "paused time stands still");
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms(), start + 90_000);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_ms(), start + 90_000 + 3_600_000);
    }

    #[test]
    fn the_system_clock_reads_the_wall_clock() {
        let before = tether_wire::now_ms();
        let read = Clock::system().now_ms();
        assert!(
            read >= before && read - before < 60_000,
            "{read} vs {before}"
        );
    }
}
