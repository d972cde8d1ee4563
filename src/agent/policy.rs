//! pm2's restart policy, as pure state and arithmetic (lib/God.js `handleExit`, lib/Worker.js).
//!
//! Quirks kept on purpose (pm2 7.0.3): unstable restarts are only counted during the first
//! `min_uptime × max_restarts` of an app's life (since creation or the last manual restart), so a
//! process that crashes later restarts forever (pm2 #841, #2584); the exponential backoff grows
//! ×1.5 per restart and is capped at 15 s. One divergence: pm2 resets the backoff from a 30 s
//! timer, 30 to 60 s after a good start; we reset it when the run that just ended lasted 30 s or
//! more, which is the same rule without the timer's jitter.

use crate::protocol::AppSpec;
use tokio::time::{Duration, Instant};

/// pm2's hard-coded backoff cap.
pub const BACKOFF_CAP: Duration = Duration::from_millis(15_000);
/// pm2's `EXP_BACKOFF_RESET_TIMER`.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_millis(30_000);

/// Restart bookkeeping of one process.
#[derive(Debug, Clone)]
pub struct RestartState {
    /// Creation, or the last manual restart (pm2 `created_at`); `None` after an overlimit.
    pub created_at: Option<Instant>,
    /// Start of the current run (pm2 `pm_uptime`).
    pub started_at: Instant,
    /// pm2 `unstable_restarts`.
    pub unstable_restarts: u32,
    /// pm2 `prev_restart_delay`, in ms.
    pub prev_restart_delay: Duration,
}

/// What to do after an unexpected exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do not restart: `autorestart` is off or the code is a stop exit code; status `stopped`.
    Stop,
    /// Too many unstable restarts: status `errored`, emit `restart overlimit`.
    Overlimit,
    /// Restart after this delay (zero means now).
    Restart(Duration),
}

impl RestartState {
    /// A fresh state at creation.
    pub fn new(now: Instant) -> Self {
        Self {
            created_at: Some(now),
            started_at: now,
            unstable_restarts: 0,
            prev_restart_delay: Duration::ZERO,
        }
    }

    /// pm2 `resetState`, on a manual restart or reload.
    pub fn reset(&mut self, now: Instant) {
        *self = Self::new(now);
    }

    /// Call when a new run starts.
    pub fn started(&mut self, now: Instant) {
        self.started_at = now;
    }

    /// Applies pm2's `handleExit` arithmetic to an exit that nobody asked for.
    pub fn on_exit(&mut self, now: Instant, exit_code: Option<i32>, spec: &AppSpec) -> Decision {
        let stop_code = exit_code.is_some_and(|c| spec.stop_exit_codes.0.contains(&c));
        let uptime = now.saturating_duration_since(self.started_at);
        if let Some(created) = self.created_at
            && spec
                .min_uptime
                .checked_mul(spec.max_restarts)
                .is_none_or(|window| now.saturating_duration_since(created) < window)
            && uptime < spec.min_uptime
        {
            self.unstable_restarts += 1;
        }
        if self.unstable_restarts >= spec.max_restarts {
            self.unstable_restarts = 0;
            self.created_at = None;
            return Decision::Overlimit;
        }
        if !spec.autorestart || stop_code {
            return Decision::Stop;
        }
        if uptime >= BACKOFF_RESET_AFTER {
            self.prev_restart_delay = Duration::ZERO;
        }
        let delay = match spec.exp_backoff_restart_delay {
            Some(base) => {
                let next = if self.prev_restart_delay.is_zero() {
                    base
                } else {
                    let grown = self.prev_restart_delay.as_millis() as f64 * 1.5;
                    Duration::from_millis(grown.min(BACKOFF_CAP.as_millis() as f64).floor() as u64)
                };
                self.prev_restart_delay = next;
                next
            }
            None => spec.restart_delay,
        };
        Decision::Restart(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AppSpec {
        AppSpec::new("a", "/x.js")
    }

    #[tokio::test(start_paused = true)]
    async fn unstable_restarts_reach_the_limit_then_errored() {
        let mut s = spec();
        s.max_restarts = 3;
        let mut st = RestartState::new(Instant::now());
        for _ in 0..2 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!(
                st.on_exit(Instant::now(), Some(1), &s),
                Decision::Restart(Duration::ZERO)
            );
            st.started(Instant::now());
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(st.on_exit(Instant::now(), Some(1), &s), Decision::Overlimit);
        assert_eq!(st.unstable_restarts, 0);
        assert_eq!(st.created_at, None);
    }

    #[tokio::test(start_paused = true)]
    async fn crashes_after_the_counting_window_are_never_counted_like_pm2() {
        let s = spec(); // min_uptime 1 s × max_restarts 16 = 16 s window
        let mut st = RestartState::new(Instant::now());
        tokio::time::advance(Duration::from_secs(17)).await;
        for _ in 0..100 {
            st.started(Instant::now());
            tokio::time::advance(Duration::from_millis(10)).await;
            assert_eq!(
                st.on_exit(Instant::now(), Some(1), &s),
                Decision::Restart(Duration::ZERO)
            );
        }
        assert_eq!(st.unstable_restarts, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stable_runs_are_not_counted() {
        let s = spec();
        let mut st = RestartState::new(Instant::now());
        tokio::time::advance(Duration::from_millis(1500)).await;
        st.on_exit(Instant::now(), Some(1), &s);
        assert_eq!(st.unstable_restarts, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_exit_codes_and_autorestart_off_stop() {
        let mut s = spec();
        s.stop_exit_codes.0 = vec![0, 3];
        let mut st = RestartState::new(Instant::now());
        assert_eq!(st.on_exit(Instant::now(), Some(3), &s), Decision::Stop);
        assert_eq!(
            st.on_exit(Instant::now(), Some(1), &s),
            Decision::Restart(Duration::ZERO)
        );
        s.autorestart = false;
        assert_eq!(st.on_exit(Instant::now(), Some(1), &s), Decision::Stop);
    }

    #[tokio::test(start_paused = true)]
    async fn restart_delay_is_fixed() {
        let mut s = spec();
        s.restart_delay = Duration::from_millis(250);
        let mut st = RestartState::new(Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            st.on_exit(Instant::now(), Some(1), &s),
            Decision::Restart(Duration::from_millis(250))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exponential_backoff_follows_pm2s_formula_and_cap() {
        let mut s = spec();
        s.exp_backoff_restart_delay = Some(Duration::from_millis(100));
        s.restart_delay = Duration::from_millis(9999); // overridden
        let mut st = RestartState::new(Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await; // outside the unstable window
        let mut got = vec![];
        for _ in 0..14 {
            st.started(Instant::now());
            tokio::time::advance(Duration::from_millis(50)).await;
            match st.on_exit(Instant::now(), Some(1), &s) {
                Decision::Restart(d) => got.push(d.as_millis() as u64),
                other => panic!("{other:?}"),
            }
        }
        // 100, floor(100*1.5)=150, 225, 337, 505, 757, 1135, 1702, 2553, 3829, 5743, 8614, 12921, 15000
        assert_eq!(
            got,
            vec![
                100, 150, 225, 337, 505, 757, 1135, 1702, 2553, 3829, 5743, 8614, 12921, 15000
            ]
        );
        // a run of 30 s resets the backoff
        st.started(Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            st.on_exit(Instant::now(), Some(1), &s),
            Decision::Restart(Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_base_above_the_cap_is_used_once() {
        let mut s = spec();
        s.exp_backoff_restart_delay = Some(Duration::from_millis(20_000));
        let mut st = RestartState::new(Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
        st.started(Instant::now());
        let d1 = st.on_exit(Instant::now(), Some(1), &s);
        st.started(Instant::now());
        let d2 = st.on_exit(Instant::now(), Some(1), &s);
        assert_eq!(d1, Decision::Restart(Duration::from_millis(20_000)));
        assert_eq!(d2, Decision::Restart(BACKOFF_CAP));
    }

    #[tokio::test(start_paused = true)]
    async fn huge_settings_do_not_overflow() {
        let mut s = spec();
        s.min_uptime = Duration::from_millis(crate::protocol::duration::MAX_MS);
        s.max_restarts = u32::MAX;
        let mut st = RestartState::new(Instant::now());
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(
            st.on_exit(Instant::now(), Some(1), &s),
            Decision::Restart(Duration::ZERO)
        );
        assert_eq!(st.unstable_restarts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn manual_restart_resets_counters() {
        let mut s = spec();
        s.max_restarts = 2;
        let mut st = RestartState::new(Instant::now());
        st.on_exit(Instant::now(), Some(1), &s);
        assert_eq!(st.unstable_restarts, 1);
        st.reset(Instant::now());
        assert_eq!(st.unstable_restarts, 0);
        assert!(st.created_at.is_some());
    }
}
