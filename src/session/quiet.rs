//! `Quiet`: a future that is polled again only when its own waker fired, not on every wake of the task
//! that holds it. A session's end conditions (its epoch ends, staybound shuts down, it went idle) are
//! `Quiet`, so a wake-up for relayed bytes costs the failover machinery nothing: no lock, no atomic
//! read-modify-write, nothing but a load of one flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Remembers that the inner future asked to be polled, and wakes the task that holds it.
struct Flag {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(w) = self.task.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            w.wake_by_ref();
        }
    }
}

/// Wraps `F` so that it is polled once, then again only after it woke.
pub(super) struct Quiet<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<F: Future> Quiet<F> {
    pub(super) fn new(inner: F) -> Quiet<F> {
        let flag = Arc::new(Flag { fired: AtomicBool::new(true), task: Mutex::new(None) });
        Quiet { inner: Box::pin(inner), waker: Waker::from(flag.clone()), flag }
    }
}

impl<F: Future> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.flag.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        {
            // Keep the task's waker current (it rarely changes: only when the task moves).
            let mut task = self.flag.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let this = &mut *self;
        let mut own = Context::from_waker(&this.waker);
        this.inner.as_mut().poll(&mut own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set and it was woken.
    struct Counted {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.open.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn polled_only_when_it_woke() {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None));
        let mut q = Box::pin(Quiet::new(Counted { polls: polls.clone(), open: open.clone(), waker: waker.clone() }));
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        assert!(q.as_mut().poll(&mut cx).is_pending());
        for _ in 0..100 {
            assert!(q.as_mut().poll(&mut cx).is_pending(), "other wake-ups of the task");
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "the inner future was polled once, not 101 times");
        open.store(true, Ordering::Relaxed);
        waker.lock().unwrap().take().unwrap().wake();
        assert!(q.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
