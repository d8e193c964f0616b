//! The timekeeper: the one task of a model, woken only when something must happen without an
//! arrival or a finishing instance to do it. It sleeps until the earliest armed deadline (a
//! delay window that ends while an instance is idle, a queue timeout even while every instance is
//! busy), clears out requests whose callers left, and runs the shutdown. Arrivals and instances
//! wake it only when they move that deadline earlier, so it sleeps through steady traffic; with
//! no traffic it has no deadline and never wakes.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::super::timer::PreciseTimer;
use super::queue::Released;
use super::Shared;

/// Deadlines closer than this also arm the precise timer: tokio's timer rounds up to the next
/// millisecond, which matters for sub-millisecond windows and little beyond.
const PRECISE_BELOW: Duration = Duration::from_millis(2);

pub(super) async fn run(
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    finished: watch::Sender<bool>,
) {
    // Started the first time a deadline needs it: a model whose deadlines are all a few
    // milliseconds away or more (or that has none) runs no timer thread.
    let mut timer: Option<PreciseTimer> = None;
    loop {
        let (wake, done) = look(&shared);
        if done {
            break;
        }
        let precise =
            wake.filter(|at| at.saturating_duration_since(Instant::now()) < PRECISE_BELOW);
        if precise.is_some() || timer.is_some() {
            timer
                .get_or_insert_with(|| {
                    PreciseTimer::start(format!("{}-timer", shared.settings.model))
                })
                .set(precise.map(Instant::into_std));
        }
        tokio::select! {
            biased;
            _ = shared.timekeeper.notified() => {}
            _ = precise_fired(timer.as_ref()) => {}
            _ = sleep_until_or_forever(wake) => {}
        }
    }
    drop(timer);
    stop_instances(&shared, threads).await;
    let _ = finished.send(true);
}

/// One look at the queue: sweep, time out, feed idle instances. Returns when to look again and
/// whether the shutdown's drain is complete.
fn look(shared: &Shared) -> (Option<Instant>, bool) {
    let now = Instant::now();
    let mut released = Released::default();
    let sweep = shared.sweep_wanted.swap(false, Ordering::AcqRel);
    let outcome = {
        let mut core = shared.core.lock();
        #[cfg(test)]
        {
            core.timekeeper_passes += 1;
        }
        if sweep {
            released.cancelled = core.policy.sweep_cancelled();
        }
        core.expire(now, &mut released);
        let wake = core.feed_idle(now, &shared.mailboxes, &shared.stats, &mut released);
        core.set_armed(wake);
        (wake, core.drained())
    };
    released.settle(&shared.stats, &shared.timekeeper);
    outcome
}

/// Closes every mailbox (the instances exit as they finish) and waits for the threads off the
/// reactor.
async fn stop_instances(shared: &Shared, threads: Vec<JoinHandle<()>>) {
    for mailbox in &shared.mailboxes {
        mailbox.close();
    }
    let joined = tokio::task::spawn_blocking(move || {
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a model instance thread panicked");
            }
        }
    })
    .await;
    if joined.is_err() {
        tracing::error!("failed to join the model instance threads");
    }
}

async fn precise_fired(timer: Option<&PreciseTimer>) {
    match timer {
        Some(timer) => timer.fired().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
