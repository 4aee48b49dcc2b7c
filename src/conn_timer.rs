//! One timer for every wait of a client connection.
//!
//! An HTTP/1 connection waits for one thing at a time: its next request
//! (the idle and header-read timeouts), then its worker's answer (the
//! response timeout), then its next request again. A fresh tokio timer per
//! wait is registered in the runtime's timer wheel and removed from it again
//! for every request (dropping both timers outright saved about 3% of the
//! CPU per short request under load). This timer stays registered across
//! the waits instead: 1.4 to 1.8% less CPU per request (BENCHMARKS.md).
//!
//! Setting it records the deadline wanted. The registered deadline is moved
//! only when the wanted one is earlier, so it is never later than the
//! wanted one; when it passes first, the timer re-registers for the wanted
//! one. As the deadlines move on with each request, that happens about once
//! per timeout period, not once per request.

use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};

/// The timer of one connection (HTTP/1), or of one request (each HTTP/2
/// stream: a clone gets its own timer, as the streams wait side by side).
#[derive(Debug, Default)]
pub struct ConnTimer {
    // Only the connection's own task uses it: the lock is never contended.
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Made at the first wait, inside the runtime (and not at all for a
    /// connection that never sends a request).
    sleep: Option<Pin<Box<Sleep>>>,
    wanted: Option<Instant>,
}

impl Clone for ConnTimer {
    fn clone(&self) -> ConnTimer {
        ConnTimer::default()
    }
}

impl ConnTimer {
    /// From now on, [`ConnTimer::poll_expired`] is ready once `at` has
    /// passed.
    pub fn set(&self, at: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.wanted = Some(at);
        match &mut inner.sleep {
            Some(sleep) if at < sleep.deadline() => sleep.as_mut().reset(at),
            Some(_) => {}
            None => inner.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Ready once the deadline last set has passed (pending forever if
    /// none was set).
    pub fn poll_expired(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner { sleep, wanted } = &mut *inner;
        let (Some(sleep), Some(wanted)) = (sleep, *wanted) else {
            return Poll::Pending;
        };
        loop {
            ready!(sleep.as_mut().poll(cx));
            // Fired for the wanted time (or a later one, set by a wait
            // that has since ended), or early: then wait on.
            if sleep.deadline() >= wanted {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(wanted);
        }
    }

    /// Waits until the deadline last set has passed.
    pub async fn expired(&self) {
        std::future::poll_fn(|cx| self.poll_expired(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn now_ready(timer: &ConnTimer) -> bool {
        let waker = std::task::Waker::noop();
        timer
            .poll_expired(&mut Context::from_waker(waker))
            .is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_wanted_deadline_when_it_moves_later() {
        let timer = ConnTimer::default();
        let start = Instant::now();
        timer.set(start + Duration::from_secs(20));
        assert!(!now_ready(&timer));
        // The next request's wait: registered deadline stays at 20 s.
        timer.set(start + Duration::from_secs(75));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!now_ready(&timer), "a later deadline must not fire early");
        timer.expired().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(75));
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_an_earlier_deadline_set_after_a_later_one() {
        let timer = ConnTimer::default();
        let start = Instant::now();
        timer.set(start + Duration::from_secs(75));
        assert!(!now_ready(&timer));
        timer.set(start + Duration::from_secs(20));
        timer.expired().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_moved_on_before_it_was_seen_does_not_fire() {
        let timer = ConnTimer::default();
        let start = Instant::now();
        timer.set(start + Duration::from_secs(1));
        assert!(!now_ready(&timer));
        tokio::time::advance(Duration::from_secs(2)).await;
        // The connection moved on to its next wait before looking.
        timer.set(Instant::now() + Duration::from_secs(60));
        assert!(!now_ready(&timer));
        timer.expired().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(62));
    }

    #[tokio::test(start_paused = true)]
    async fn a_clone_is_a_timer_of_its_own() {
        let timer = ConnTimer::default();
        timer.set(Instant::now());
        let clone = timer.clone();
        assert!(now_ready(&timer));
        assert!(!now_ready(&clone), "nothing set on the clone");
    }
}
