//! One service as it runs: its settings, metric handles, detector handle, connector, retry budget, the
//! views of the services it depends on, and its session counts. Everything a session needs, in one place.
//!
//! A reload makes a new generation of a `Service`; what must hold across generations is in `Lasting`: the
//! session counts, the `max_connections` limit (resized, never replaced, so the sessions made before count),
//! the retry budget and the connector (so a client held since before a reload dials the new address).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::config::ServiceConfig;
use crate::failover::{DetectorHandle, HostView};
use crate::metrics::{ConnectCounts, ServiceMetrics};
use crate::pace::Pacer;
use crate::upstream::Connector;
use crate::upstream::retry::RetryBudget;

/// A service's shared state.
pub struct Service {
    pub cfg: Arc<ServiceConfig>,
    pub metrics: Arc<ServiceMetrics>,
    /// Shared by every generation: a client held since before a reload dials what the config says now.
    pub connector: Arc<ArcSwap<Connector>>,
    pub detector: DetectorHandle,
    /// The services this one depends on, directly or transitively, by name.
    pub deps: Vec<(String, watch::Receiver<HostView>)>,
    pub budget: Arc<RetryBudget>,
    /// The release of held clients after a takeover, paced (`pace`).
    pub(crate) pacer: Arc<Pacer>,
    /// One permit per client session, held or proxying.
    pub limit: Arc<Limit>,
    pub counts: Arc<Counts>,
}

/// What every generation of a service shares across reloads.
#[derive(Clone)]
pub struct Lasting {
    pub counts: Arc<Counts>,
    pub limit: Arc<Limit>,
    pub budget: Arc<RetryBudget>,
    pub(crate) pacer: Arc<Pacer>,
    pub connector: Arc<ArcSwap<Connector>>,
}

impl Lasting {
    pub fn new(cfg: &Arc<ServiceConfig>, counts: ConnectCounts) -> Lasting {
        Lasting {
            counts: Arc::new(Counts::default()),
            limit: Limit::new(cfg.max_connections),
            budget: Arc::new(RetryBudget::new(&cfg.ride_out, Instant::now())),
            pacer: Arc::default(),
            connector: Arc::new(ArcSwap::from_pointee(Connector::new(cfg.clone(), counts))),
        }
    }

    /// Takes a reload's settings: the limit is resized, the budget keeps its window, the release keeps its
    /// slots, the connector is new.
    pub(crate) fn reconfigure(&self, cfg: &Arc<ServiceConfig>) {
        self.limit.resize(cfg.max_connections);
        self.budget.reconfigure(&cfg.ride_out);
        self.connector.store(Arc::new(self.connector.load().reloaded(cfg.clone())));
    }
}

/// `max_connections`: a semaphore that can be resized while its permits are out.
#[derive(Debug)]
pub struct Limit {
    sem: Arc<Semaphore>,
    sizes: Mutex<Sizes>,
}

#[derive(Debug)]
struct Sizes {
    /// The configured limit.
    size: usize,
    /// Permits to forget when they come back: the limit shrank below the sessions then open.
    debt: usize,
}

impl Limit {
    pub fn new(size: usize) -> Arc<Limit> {
        Arc::new(Limit { sem: Arc::new(Semaphore::new(size)), sizes: Mutex::new(Sizes { size, debt: 0 }) })
    }

    /// A permit for one more session, if the limit allows it now.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let permit = self.sem.clone().try_acquire_owned().ok()?;
        Some(Permit { permit: Some(permit), limit: self.clone() })
    }

    /// Sets the limit. Growing adds permits at once; shrinking takes the free ones at once and the rest as
    /// sessions end, so no new session starts until fewer than `size` are open.
    pub(crate) fn resize(&self, size: usize) {
        let mut s = self.sizes.lock().unwrap_or_else(|e| e.into_inner());
        if size > s.size {
            let grow = size - s.size;
            let paid = grow.min(s.debt);
            s.debt -= paid;
            self.sem.add_permits(grow - paid);
        } else {
            let shrink = s.size - size;
            let taken = self.sem.forget_permits(shrink);
            s.debt += shrink - taken;
        }
        s.size = size;
    }

    pub fn size(&self) -> usize {
        self.sizes.lock().unwrap_or_else(|e| e.into_inner()).size
    }

    /// Permits free now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// One session's place under its service's `max_connections`.
#[derive(Debug)]
pub(crate) struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<Limit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.limit.sizes.lock().unwrap_or_else(|e| e.into_inner());
        let permit = self.permit.take();
        if s.debt > 0 {
            s.debt -= 1;
            if let Some(p) = permit {
                p.forget();
            }
        } else {
            // why: given back under the lock, so a shrink in progress counts it as free, not as owed.
            drop(permit);
        }
    }
}

/// Live session counts, shared by every generation of a service across reloads.
#[derive(Debug, Default)]
pub struct Counts {
    active: AtomicI64,
    held: AtomicI64,
}

impl Counts {
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed)
    }
    pub fn held(&self) -> i64 {
        self.held.load(Ordering::Relaxed)
    }
}

impl Service {
    pub fn new(
        cfg: Arc<ServiceConfig>,
        metrics: Arc<ServiceMetrics>,
        detector: DetectorHandle,
        deps: Vec<(String, watch::Receiver<HostView>)>,
        lasting: &Lasting,
    ) -> Service {
        Service {
            connector: lasting.connector.clone(),
            budget: lasting.budget.clone(),
            pacer: lasting.pacer.clone(),
            limit: lasting.limit.clone(),
            counts: lasting.counts.clone(),
            cfg,
            metrics,
            detector,
            deps,
        }
    }

    /// The first dependency whose upstream is not up, if any.
    pub(crate) fn missing_dependency(&self) -> Option<&str> {
        self.deps.iter().find(|(_, rx)| !rx.borrow().state.connectable()).map(|(n, _)| n.as_str())
    }

    /// Whether a new session may connect now: this host up, and every dependency up.
    pub(crate) fn connectable(&self) -> bool {
        self.detector.view.borrow().state.connectable() && self.missing_dependency().is_none()
    }

    pub(crate) fn active_guard(&self) -> CountGuard {
        CountGuard::new(self, Kind::Active)
    }

    pub(crate) fn held_guard(&self) -> CountGuard {
        CountGuard::new(self, Kind::Held)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Active,
    Held,
}

/// Counts a session as active or held while it lives, in the gauge and in `/status`.
pub(crate) struct CountGuard {
    counts: Arc<Counts>,
    gauge: metrics::Gauge,
    kind: Kind,
}

impl CountGuard {
    fn new(svc: &Service, kind: Kind) -> CountGuard {
        let gauge = match kind {
            Kind::Active => svc.metrics.active.clone(),
            Kind::Held => svc.metrics.held.clone(),
        };
        gauge.increment(1.0);
        let counts = svc.counts.clone();
        match kind {
            Kind::Active => counts.active.fetch_add(1, Ordering::Relaxed),
            Kind::Held => counts.held.fetch_add(1, Ordering::Relaxed),
        };
        CountGuard { counts, gauge, kind }
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        match self.kind {
            Kind::Active => self.counts.active.fetch_sub(1, Ordering::Relaxed),
            Kind::Held => self.counts.held.fetch_sub(1, Ordering::Relaxed),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(limit: &Arc<Limit>, n: usize) -> Vec<Permit> {
        (0..n).map_while(|_| limit.try_acquire()).collect()
    }

    #[test]
    fn a_limit_grows_at_once() {
        let limit = Limit::new(2);
        let held = take(&limit, 5);
        assert_eq!(held.len(), 2);
        limit.resize(4);
        assert_eq!(take(&limit, 5).len(), 2, "two more after growing to 4");
    }

    #[test]
    fn a_limit_shrinks_as_sessions_end() {
        let limit = Limit::new(3);
        let mut held = take(&limit, 3);
        limit.resize(1);
        assert!(limit.try_acquire().is_none());
        held.pop();
        assert!(limit.try_acquire().is_none(), "2 open at a limit of 1");
        held.pop();
        assert!(limit.try_acquire().is_none(), "1 open at a limit of 1");
        held.pop();
        let one = take(&limit, 3);
        assert_eq!(one.len(), 1, "none open: one fits");
        drop(one);
        assert_eq!(limit.available(), 1);
    }

    #[test]
    fn a_shrink_takes_free_permits_at_once_and_a_grow_pays_the_rest() {
        let limit = Limit::new(4);
        let mut held = take(&limit, 2);
        limit.resize(1);
        assert_eq!(limit.available(), 0, "the two free permits were taken, one is owed");
        limit.resize(3);
        assert_eq!(limit.available(), 1, "growing by 2 pays the one owed and frees one");
        held.extend(take(&limit, 5));
        assert_eq!(held.len(), 3);
        drop(held);
        assert_eq!((limit.available(), limit.size()), (3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_release_schedule_and_takes_the_new_rate() {
        let cfg = |rate: u32| {
            let text = format!(
                "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n[service.hold]\nrelease_rate = {rate}\n"
            );
            let c = crate::config::Config::from_toml_str(&text, std::path::Path::new("t.toml")).unwrap();
            Arc::new(c.services[0].clone())
        };
        let old = cfg(10);
        let lasting = Lasting::new(&old, ConnectCounts::unrecorded());
        let t0 = Instant::now();
        lasting.pacer.turn(old.ride_out.release_rate.unwrap()).await;
        assert_eq!(Instant::now(), t0, "the first attempt goes at once");
        let pacer = lasting.pacer.clone();
        let new = cfg(20);
        lasting.reconfigure(&new);
        assert!(Arc::ptr_eq(&pacer, &lasting.pacer), "the same schedule after the reload");
        // The turn taken before the reload still counts: the next waits out the old spacing (100 ms), the
        // one after it the new one (50 ms).
        let rate = new.ride_out.release_rate.unwrap();
        lasting.pacer.turn(rate).await;
        assert_eq!(Instant::now() - t0, std::time::Duration::from_millis(100));
        lasting.pacer.turn(rate).await;
        assert_eq!(Instant::now() - t0, std::time::Duration::from_millis(150));
        assert_eq!(new.ride_out.release_rate, Some(20));
        assert_eq!(cfg(0).ride_out.release_rate, None, "0: all at once");
    }
}
