//! A sub-millisecond wake-up for the batcher.
//!
//! Tokio's timer wheel ticks in whole milliseconds and rounds a deadline up to the next tick, so a
//! `max_queue_delay_microseconds` of 100 or 500 became a wait of 1-2 ms: at one request in flight
//! the 500 µs window of mlp_bench added 2.1 ms to every request. A parked OS thread wakes within
//! tens of microseconds of its deadline, so the batcher arms this timer beside its tokio sleep and
//! wakes at whichever fires first (the tokio sleep alone still drives tokio's paused clock in tests).
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct PreciseTimer {
    shared: Arc<TimerShared>,
}

#[derive(Debug, Default)]
struct TimerShared {
    state: Mutex<TimerState>,
    changed: Condvar,
    fired: Notify,
}

#[derive(Debug, Default)]
struct TimerState {
    deadline: Option<Instant>,
    /// The last deadline that fired: arming it again is ignored, so a deadline the clock has
    /// already passed wakes the batcher once, not in a loop (tokio's paused clock in tests lags
    /// the real one, and its deadlines can lie in the real past).
    last_fired: Option<Instant>,
    stop: bool,
}

impl PreciseTimer {
    /// Starts the timer thread. If the thread cannot start, the timer never fires and the batcher
    /// falls back on tokio's millisecond timer.
    pub(crate) fn start(name: String) -> PreciseTimer {
        let shared = Arc::new(TimerShared::default());
        let thread_shared = Arc::clone(&shared);
        if let Err(error) = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(&thread_shared))
        {
            tracing::warn!(thread = %name, %error, "precise batch timer unavailable; delays round up to milliseconds");
        }
        PreciseTimer { shared }
    }

    /// Wakes `fired` at `at` (replacing any earlier setting); None disarms.
    pub(crate) fn set(&self, at: Option<Instant>) {
        let mut state = self.shared.state.lock();
        if state.deadline == at || (at.is_some() && at == state.last_fired) {
            return;
        }
        state.deadline = at;
        self.shared.changed.notify_one();
    }

    /// Resolves once an armed deadline has passed (or at once if it passed since the last call).
    pub(crate) async fn fired(&self) {
        self.shared.fired.notified().await;
    }
}

impl Drop for PreciseTimer {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.changed.notify_one();
    }
}

fn run(shared: &TimerShared) {
    let mut state = shared.state.lock();
    loop {
        if state.stop {
            return;
        }
        match state.deadline {
            None => shared.changed.wait(&mut state),
            Some(deadline) if Instant::now() >= deadline => {
                state.deadline = None;
                state.last_fired = Some(deadline);
                shared.fired.notify_one();
            }
            Some(deadline) => {
                shared.changed.wait_until(&mut state, deadline);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_once_per_deadline() {
        let timer = PreciseTimer::start("timer-test".into());
        let at = Instant::now() + Duration::from_millis(1);
        timer.set(Some(at));
        tokio::time::timeout(Duration::from_secs(10), timer.fired())
            .await
            .expect("fires");
        // Re-arming the deadline that fired is ignored; a new one fires.
        timer.set(Some(at));
        assert!(timer.shared.state.lock().deadline.is_none());
        timer.set(Some(Instant::now()));
        tokio::time::timeout(Duration::from_secs(10), timer.fired())
            .await
            .expect("fires again");
    }
}
