//! Client affinity on shared ports: which functions a client address called recently.
//! A SYN to the shared port names no function, but a client that called exactly one
//! function within the window most likely calls it again (trigger `affinity`).
//!
//! Pure and bounded: times are seconds on the caller's clock; at most `max_clients`
//! addresses are remembered (the least recently seen are forgotten first).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Functions remembered per client; a client calling more is ambiguous anyway.
const PER_CLIENT: usize = 4;

#[derive(Debug)]
pub struct Affinity<C, F> {
    window: f64,
    max_clients: usize,
    recent: HashMap<C, Recent<F>>,
    /// Clients in the order they were last seen (may hold stale duplicates).
    order: VecDeque<(C, f64)>,
}

#[derive(Debug)]
struct Recent<F> {
    last_seen: f64,
    calls: Vec<(F, f64)>,
}

impl<C: Hash + Eq + Clone, F: Eq + Clone> Affinity<C, F> {
    pub fn new(window_secs: f64, max_clients: usize) -> Self {
        Affinity {
            window: window_secs,
            max_clients: max_clients.max(1),
            recent: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// `client` called `function` at `now`.
    pub fn record(&mut self, client: C, function: F, now: f64) {
        let r = self.recent.entry(client.clone()).or_insert(Recent {
            last_seen: now,
            calls: Vec::new(),
        });
        r.last_seen = now;
        r.calls.retain(|(f, _)| *f != function);
        r.calls.push((function, now));
        if r.calls.len() > PER_CLIENT {
            r.calls.remove(0);
        }
        self.order.push_back((client, now));
        self.evict();
    }

    fn evict(&mut self) {
        if self.order.len() > 2 * self.max_clients {
            // Compact: one entry per remembered client, oldest first.
            let mut live: Vec<(C, f64)> = self
                .recent
                .iter()
                .map(|(c, r)| (c.clone(), r.last_seen))
                .collect();
            live.sort_by(|a, b| a.1.total_cmp(&b.1));
            self.order = live.into();
        }
        while self.recent.len() > self.max_clients {
            let Some((c, seen)) = self.order.pop_front() else {
                break;
            };
            // Entries for clients seen again later are stale: skip them.
            if self.recent.get(&c).is_some_and(|r| r.last_seen == seen) {
                self.recent.remove(&c);
            }
        }
    }

    /// The one function `client` called within the window before `now`, if exactly one.
    pub fn sole_function(&self, client: &C, now: f64) -> Option<F> {
        let r = self.recent.get(client)?;
        let mut found: Option<&F> = None;
        for (f, t) in &r.calls {
            let age = now - t;
            if (0.0..=self.window).contains(&age) {
                if found.is_some() {
                    return None;
                }
                found = Some(f);
            }
        }
        found.cloned()
    }

    pub fn clients(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_recent_function_matches() {
        let mut a: Affinity<&str, &str> = Affinity::new(60.0, 100);
        assert_eq!(a.sole_function(&"c1", 0.0), None);
        a.record("c1", "f", 0.0);
        assert_eq!(a.sole_function(&"c1", 30.0), Some("f"));
        assert_eq!(a.sole_function(&"c2", 30.0), None);
        a.record("c1", "g", 40.0);
        assert_eq!(
            a.sole_function(&"c1", 50.0),
            None,
            "two functions: ambiguous"
        );
        // f's call leaves the window; g is again the only one.
        assert_eq!(a.sole_function(&"c1", 90.0), Some("g"));
        assert_eq!(a.sole_function(&"c1", 200.0), None, "window passed");
    }

    #[test]
    fn bounded_number_of_clients() {
        let mut a: Affinity<u32, u32> = Affinity::new(60.0, 10);
        for c in 0..1000 {
            a.record(c, 1, c as f64 * 0.01);
        }
        assert!(a.clients() <= 10);
        assert_eq!(a.sole_function(&999, 10.0), Some(1));
        assert_eq!(a.sole_function(&0, 10.0), None, "oldest forgotten");
        assert!(a.order.len() <= 20);
    }
}
