//! What a running staybound shows of itself: the services now running, each with its current generation
//! and listen addresses, and the metric registry. The server writes it (at start and at each reload); the
//! admin server and the demo read it. It depends on none of them, so the admin server does not depend on the
//! server (the demo starts and stops one, and reads it only here).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::AdminConfig;
use crate::metrics::Telemetry;
use crate::service::Service;
use crate::udp;

/// The services now running, the metric registry, and the admin settings in force.
pub struct Registry {
    pub telemetry: Telemetry,
    pub services: ArcSwap<Vec<Arc<Entry>>>,
    /// The admin settings now in force: the hook's token and rate change with a reload, the listen
    /// address only at a restart.
    pub admin: ArcSwap<AdminConfig>,
    /// Guard mode: whether sockets can be destroyed here, and each guard service's last epoch end.
    pub guard: Arc<crate::guard::Board>,
    /// Transparent mode: whether this process installed the interception rules.
    pub intercept: crate::intercept::Board,
}

/// One running service as its readers see it.
pub struct Entry {
    pub name: String,
    pub service: Arc<ArcSwap<Service>>,
    /// The bound listen addresses (ports resolved); for a UDP service, those bound at start (see `udp`).
    pub listen: Vec<SocketAddr>,
    /// A UDP service's listen addresses as bound so far: one not on this host at start is bound later.
    pub udp: Option<udp::BoundAddrs>,
}

impl Entry {
    /// The listen addresses bound now.
    pub fn bound(&self) -> Vec<SocketAddr> {
        match &self.udp {
            Some(u) => u.bound(),
            None => self.listen.clone(),
        }
    }
}

impl Registry {
    pub fn new(telemetry: Telemetry, admin: AdminConfig) -> Registry {
        Registry {
            telemetry,
            services: ArcSwap::from_pointee(Vec::new()),
            admin: ArcSwap::from_pointee(admin),
            guard: Arc::default(),
            intercept: crate::intercept::Board::default(),
        }
    }

    /// The running service named `name`.
    pub fn entry(&self, name: &str) -> Option<Arc<Entry>> {
        self.services.load().iter().find(|e| e.name == name).cloned()
    }
}
