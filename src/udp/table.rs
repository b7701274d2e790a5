//! The flow table of one listener, in order of use, and the decision on a new client's datagram. Both are free
//! of I/O: the listener (`listener`) calls them and does the sockets, counters and log lines.
//!
//! The table keeps its entries in a doubly linked list threaded through a slab, most recently used first, so a
//! lookup, a use (moved to the front), an insert, a removal and taking the least recently used entry are each
//! O(1). Use is what the listener reports: a datagram from the client. Replies do not move a flow (they arrive
//! on the flow's own task); a flow that only receives is the first to go when the table is full.

use std::collections::HashMap;
use std::hash::Hash;

/// What to do with a datagram from a client that has no flow yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// A place is free: make the flow.
    Open,
    /// The service is at `max_flows`: end this listener's least recently used flow, then make the flow.
    EvictThenOpen,
    /// The client's address has `max_flows_per_source` flows already: drop the datagram (`source_limit`).
    SourceLimit,
    /// The service is at `max_flows` and this listener has no flow to end (the others hold them all): drop the
    /// datagram (`flow_limit`).
    FlowLimit,
}

/// The decision on a new client's datagram: `flows` alive in the service (across its listeners), `own` of them
/// in this listener, `from_source` of them from the client's address.
///
/// why: the per-source check comes first, so one address can neither take the table nor, at its limit, push
/// other clients' flows out; eviction comes before refusal, so addresses that merely pass by (spoofed ones)
/// cannot lock out a client that keeps sending.
pub(crate) fn admit(flows: usize, max_flows: usize, own: usize, from_source: usize, per_source: usize) -> Admit {
    if from_source >= per_source {
        Admit::SourceLimit
    } else if flows < max_flows {
        Admit::Open
    } else if own > 0 {
        Admit::EvictThenOpen
    } else {
        Admit::FlowLimit
    }
}

const NONE: usize = usize::MAX;

struct Node<K, V> {
    key: K,
    value: V,
    /// Toward the most recently used end.
    prev: usize,
    /// Toward the least recently used end.
    next: usize,
}

/// A map in order of use.
pub(crate) struct LruTable<K, V> {
    index: HashMap<K, usize>,
    slab: Vec<Option<Node<K, V>>>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used.
    tail: usize,
}

impl<K: Hash + Eq + Clone, V> Default for LruTable<K, V> {
    fn default() -> Self {
        LruTable { index: HashMap::new(), slab: Vec::new(), free: Vec::new(), head: NONE, tail: NONE }
    }
}

impl<K: Hash + Eq + Clone, V> LruTable<K, V> {
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        let i = *self.index.get(key)?;
        self.slab[i].as_ref().map(|n| &n.value)
    }

    /// Marks `key` as the most recently used; false when it is not in the table.
    pub(crate) fn touch(&mut self, key: &K) -> bool {
        let Some(&i) = self.index.get(key) else { return false };
        self.unlink(i);
        self.push_front(i);
        true
    }

    /// Adds `key` as the most recently used, replacing (and returning) the value it had.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let old = self.remove(&key);
        let node = Node { key: key.clone(), value, prev: NONE, next: NONE };
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(node);
                i
            }
            None => {
                self.slab.push(Some(node));
                self.slab.len() - 1
            }
        };
        self.index.insert(key, i);
        self.push_front(i);
        old
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.index.remove(key)?;
        self.take(i).map(|(_, v)| v)
    }

    /// Takes out the least recently used entry.
    pub(crate) fn pop_lru(&mut self) -> Option<(K, V)> {
        if self.tail == NONE {
            return None;
        }
        let i = self.tail;
        let (k, v) = self.take(i)?;
        self.index.remove(&k);
        Some((k, v))
    }

    /// Keeps the entries `keep` says yes to, in their order.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let mut i = self.head;
        while i != NONE {
            let Some(node) = self.slab[i].as_ref() else { break };
            let next = node.next;
            if !keep(&node.key, &node.value)
                && let Some((k, _)) = self.take(i)
            {
                self.index.remove(&k);
            }
            i = next;
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = LruTable { index: HashMap::new(), slab: Vec::new(), free: Vec::new(), head: NONE, tail: NONE };
    }

    /// Gives memory back after a flood, once at most a quarter of the room is in use.
    pub(crate) fn shrink(&mut self) {
        if self.index.capacity() > 64 && self.index.len() < self.index.capacity() / 4 {
            let mut entries = Vec::with_capacity(self.len());
            while let Some(e) = self.pop_lru() {
                entries.push(e);
            }
            self.clear();
            // Most recently used last, so it ends up in front.
            for (k, v) in entries.into_iter().rev() {
                self.insert(k, v);
            }
            self.index.shrink_to_fit();
            self.slab.shrink_to_fit();
        }
    }

    /// Keys from the most to the least recently used.
    #[cfg(test)]
    fn order(&self) -> Vec<K> {
        let mut out = Vec::new();
        let mut i = self.head;
        while i != NONE {
            let Some(node) = self.slab[i].as_ref() else { break };
            out.push(node.key.clone());
            i = node.next;
        }
        out
    }

    fn take(&mut self, i: usize) -> Option<(K, V)> {
        self.unlink(i);
        let node = self.slab.get_mut(i)?.take()?;
        self.free.push(i);
        Some((node.key, node.value))
    }

    fn unlink(&mut self, i: usize) {
        let Some(node) = self.slab[i].as_ref() else { return };
        let (prev, next) = (node.prev, node.next);
        match prev {
            NONE => self.head = next,
            p => {
                if let Some(n) = self.slab[p].as_mut() {
                    n.next = next;
                }
            }
        }
        match next {
            NONE => self.tail = prev,
            n => {
                if let Some(n) = self.slab[n].as_mut() {
                    n.prev = prev;
                }
            }
        }
    }

    fn push_front(&mut self, i: usize) {
        let old = self.head;
        if let Some(n) = self.slab[i].as_mut() {
            n.prev = NONE;
            n.next = old;
        }
        match old {
            NONE => self.tail = i,
            o => {
                if let Some(n) = self.slab[o].as_mut() {
                    n.prev = i;
                }
            }
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_is_exhaustive_over_small_tables() {
        for max in 1..6 {
            for per in 1..6 {
                for flows in 0..=max {
                    for own in 0..=flows {
                        for src in 0..=flows.min(per) {
                            let got = admit(flows, max, own, src, per);
                            let want = if src >= per {
                                Admit::SourceLimit
                            } else if flows < max {
                                Admit::Open
                            } else if own == 0 {
                                Admit::FlowLimit
                            } else {
                                Admit::EvictThenOpen
                            };
                            assert_eq!(got, want, "flows {flows}/{max}, own {own}, source {src}/{per}");
                            // Nothing but a source at its limit or a table full of other listeners' flows
                            // refuses a new client.
                            if src < per && (flows < max || own > 0) {
                                assert!(matches!(got, Admit::Open | Admit::EvictThenOpen));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The table against a plain list (most recently used first) under seeded random operations.
    #[test]
    fn the_table_keeps_the_order_of_use() {
        for seed in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut t: LruTable<u8, u32> = LruTable::default();
            let mut model: Vec<(u8, u32)> = Vec::new();
            for step in 0..300u32 {
                let k = rng.u8(0..12);
                match rng.u8(0..6) {
                    0 | 1 => {
                        let old = t.insert(k, step);
                        let pos = model.iter().position(|(mk, _)| *mk == k);
                        assert_eq!(old, pos.map(|p| model.remove(p).1));
                        model.insert(0, (k, step));
                    }
                    2 => {
                        let touched = t.touch(&k);
                        let pos = model.iter().position(|(mk, _)| *mk == k);
                        assert_eq!(touched, pos.is_some());
                        if let Some(p) = pos {
                            let e = model.remove(p);
                            model.insert(0, e);
                        }
                    }
                    3 => {
                        let pos = model.iter().position(|(mk, _)| *mk == k);
                        assert_eq!(t.remove(&k), pos.map(|p| model.remove(p).1));
                    }
                    4 => assert_eq!(t.pop_lru(), model.pop()),
                    _ => {
                        let cut = rng.u32(0..=step);
                        t.retain(|_, v| *v >= cut);
                        model.retain(|(_, v)| *v >= cut);
                    }
                }
                assert_eq!(t.len(), model.len(), "seed {seed} step {step}");
                assert_eq!(t.order(), model.iter().map(|(k, _)| *k).collect::<Vec<_>>(), "seed {seed} step {step}");
                assert_eq!(t.get(&k), model.iter().find(|(mk, _)| *mk == k).map(|(_, v)| v));
                if step % 97 == 0 {
                    t.shrink();
                    assert_eq!(t.order(), model.iter().map(|(k, _)| *k).collect::<Vec<_>>(), "after shrink");
                }
            }
        }
    }

    #[test]
    fn a_full_table_gives_up_the_flow_used_longest_ago() {
        let mut t: LruTable<&str, ()> = LruTable::default();
        for k in ["real", "spoof1", "spoof2"] {
            t.insert(k, ());
        }
        t.touch(&"real");
        assert_eq!(t.pop_lru().map(|(k, _)| k), Some("spoof1"));
        t.insert("spoof3", ());
        t.touch(&"real");
        assert_eq!(t.pop_lru().map(|(k, _)| k), Some("spoof2"));
        assert_eq!(t.pop_lru().map(|(k, _)| k), Some("spoof3"));
        assert_eq!(t.pop_lru().map(|(k, _)| k), Some("real"));
        assert_eq!(t.pop_lru().map(|(k, _)| k), None);
    }
}
