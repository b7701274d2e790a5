//! One service as it runs: its settings, metric handles, detector handle, connector, retry budget, the
//! views of the services it depends on, and its session counts. Everything a session needs, in one place.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::config::ServiceConfig;
use crate::failover::{DetectorHandle, HostView};
use crate::metrics::ServiceMetrics;
use crate::upstream::Connector;
use crate::upstream::retry::RetryBudget;

/// A service's shared state.
pub struct Service {
    pub cfg: Arc<ServiceConfig>,
    pub metrics: Arc<ServiceMetrics>,
    pub connector: Connector,
    pub detector: DetectorHandle,
    /// The services this one depends on, directly or transitively, by name.
    pub deps: Vec<(String, watch::Receiver<HostView>)>,
    pub budget: RetryBudget,
    /// One permit per client session, held or proxying.
    pub limit: Arc<Semaphore>,
    pub counts: Arc<Counts>,
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
        counts: Arc<Counts>,
    ) -> Service {
        Service {
            connector: Connector::new(cfg.clone()),
            budget: RetryBudget::new(&cfg.hold, Instant::now()),
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            metrics,
            detector,
            deps,
            counts,
        }
    }

    /// The first dependency whose upstream is not up, if any.
    pub fn missing_dependency(&self) -> Option<&str> {
        self.deps.iter().find(|(_, rx)| !rx.borrow().state.connectable()).map(|(n, _)| n.as_str())
    }

    /// Whether a new session may connect now: this host up, and every dependency up.
    pub fn connectable(&self) -> bool {
        self.detector.view.borrow().state.connectable() && self.missing_dependency().is_none()
    }

    pub fn active_guard(&self) -> CountGuard {
        CountGuard::new(self, Kind::Active)
    }

    pub fn held_guard(&self) -> CountGuard {
        CountGuard::new(self, Kind::Held)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Active,
    Held,
}

/// Counts a session as active or held while it lives, in the gauge and in `/status`.
pub struct CountGuard {
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
