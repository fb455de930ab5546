//! The pool of upstream keys: which key a request uses, and each key's circuit breaker.
//!
//! Selection is smooth weighted round-robin (nginx's): over the keys a request may use (the
//! client's pinned keys, else every key of weight above 0), each gets its weight added to a
//! running score, the highest score wins and loses the sum of the weights. Over any run of
//! requests each key's share is its weight's share within ±1 request, deterministically. Keys
//! that are benched take no part (their score stands still).
//!
//! The breaker of each key: `failures` failures in a row (a connect failure, a 5xx answer, a
//! timeout) bench it for `cool_down`; a 429 that is a rate limit benches it for the time the
//! answer named (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`), capped. When the bench
//! ends the key is half-open: exactly one request (the trial) goes to it; its success closes the
//! breaker, its failure benches the key again. When every key a request may use is benched, the
//! one whose bench ends first is used anyway: the pool steers traffic, it never refuses it (the
//! upstream's own answer then reaches the caller).
//!
//! The pool is one value built from the config, so a reload swaps it whole. Time is the
//! gateway's [`Clock`] (manual in tests). Everything runs under one short mutex: no await,
//! no allocation but the returned name's `Arc` clone.

mod rate_limit;

pub use rate_limit::{is_rate_limit_body, parse_go_duration, rate_limit_wait};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::config::Config;

pub use crate::config::DEFAULT_KEY_NAME;

/// What `imagegate_upstream_key_state` says of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Takes traffic (0).
    Healthy,
    /// Benched until its cool-down or rate-limit time ends (1).
    Benched,
    /// The bench ended: the next request is its trial (2).
    Trial,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Healthy => "healthy",
            KeyState::Benched => "benched",
            KeyState::Trial => "trial",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            KeyState::Healthy => 0.0,
            KeyState::Benched => 1.0,
            KeyState::Trial => 2.0,
        }
    }
}

/// `[upstream.breaker]`.
#[derive(Clone, Copy, Debug)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cool_down: Duration,
    pub rate_limit_default: Duration,
    pub rate_limit_max: Duration,
}

/// How one attempt on a key ended, as the breaker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An answer that is not a 5xx nor a rate-limit 429.
    Success,
    /// A connect failure, a 5xx answer, a timeout, a connection broken mid-exchange.
    Failure,
    /// A 429 rate limit, with the wait it named (if any).
    RateLimited(Option<Duration>),
    /// Nothing learnt (the attempt was abandoned): a trial is given back.
    Nothing,
}

#[derive(Clone, Copy, Debug)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Duration },
    HalfOpen { trial_out: bool },
}

struct Slot {
    breaker: Breaker,
    /// Smooth weighted round-robin score.
    score: i64,
    /// Bumped at every bench: reports of attempts picked before it are stale.
    epoch: u64,
}

/// The key chosen for one attempt. Report how it went with [`KeyPool::report`].
#[derive(Debug)]
pub struct Pick {
    pub index: usize,
    pub name: Arc<str>,
    epoch: u64,
    trial: bool,
}

/// One key's health, for the admin API and the operator's page.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyHealth {
    pub name: String,
    pub weight: u32,
    pub state: &'static str,
    /// Failures in a row so far (healthy keys).
    pub failures: u32,
    /// Milliseconds left on the bench (benched keys).
    pub benched_ms: Option<u64>,
}

/// A key's metric handles, registered once (an increment is then one atomic add).
struct KeyMetrics {
    requests: metrics::Counter,
    failures: metrics::Counter,
    benched_failures: metrics::Counter,
    benched_rate_limit: metrics::Counter,
    state: metrics::Gauge,
}

impl KeyMetrics {
    fn new(name: &str) -> KeyMetrics {
        let key = || ("key", name.to_owned());
        KeyMetrics {
            requests: metrics::counter!("imagegate_upstream_key_requests_total", &[key()]),
            failures: metrics::counter!("imagegate_upstream_key_failures_total", &[key()]),
            benched_failures: metrics::counter!(
                "imagegate_upstream_key_benched_total",
                &[key(), ("reason", "failures".to_owned())]
            ),
            benched_rate_limit: metrics::counter!(
                "imagegate_upstream_key_benched_total",
                &[key(), ("reason", "rate_limit".to_owned())]
            ),
            state: metrics::gauge!("imagegate_upstream_key_state", &[key()]),
        }
    }
}

pub struct KeyPool {
    names: Vec<Arc<str>>,
    metrics: Vec<KeyMetrics>,
    weights: Vec<u32>,
    /// Every key of weight above 0: who unpinned clients may use.
    shared: Vec<usize>,
    /// Client name → the keys it is pinned to.
    pins: HashMap<String, Vec<usize>>,
    settings: BreakerSettings,
    clock: Clock,
    slots: Mutex<Vec<Slot>>,
}

impl KeyPool {
    /// `keys`: (name, weight) in config order.
    pub fn new(
        keys: Vec<(String, u32)>,
        pins: HashMap<String, Vec<usize>>,
        settings: BreakerSettings,
        clock: Clock,
    ) -> KeyPool {
        let names: Vec<Arc<str>> = keys.iter().map(|(n, _)| Arc::from(n.as_str())).collect();
        let weights: Vec<u32> = keys.iter().map(|(_, w)| *w).collect();
        let shared = (0..keys.len()).filter(|&i| weights[i] > 0).collect();
        let slots = (0..keys.len())
            .map(|_| Slot {
                breaker: Breaker::Closed { failures: 0 },
                score: 0,
                epoch: 0,
            })
            .collect();
        let metrics: Vec<KeyMetrics> = names.iter().map(|n| KeyMetrics::new(n)).collect();
        for m in &metrics {
            m.state.set(KeyState::Healthy.gauge());
        }
        KeyPool {
            names,
            metrics,
            weights,
            shared,
            pins,
            settings,
            clock,
            slots: Mutex::new(slots),
        }
    }

    /// The pool of a config: `[[upstream.keys]]` with a loaded secret (`usable[i]` false: left
    /// out), or the single key as `default`; pins from `clients[].upstream_key`.
    pub fn from_config(config: &Config, usable: &[bool], clock: Clock) -> KeyPool {
        let u = &config.upstream;
        let keys: Vec<(String, u32)> = if u.keys.is_empty() {
            vec![(DEFAULT_KEY_NAME.to_owned(), 1)]
        } else {
            u.keys.iter().map(|k| (k.name.clone(), k.weight)).collect()
        };
        let mut pins = HashMap::new();
        for c in &config.clients {
            if let Some(pin) = &c.upstream_key {
                let idx: Vec<usize> = pin
                    .names()
                    .iter()
                    .filter_map(|n| keys.iter().position(|(k, _)| k == n))
                    .collect();
                pins.insert(c.name.clone(), idx);
            }
        }
        let b = &u.breaker;
        let mut pool = KeyPool::new(
            keys,
            pins,
            BreakerSettings {
                failures: b.failures.max(1),
                cool_down: b.cool_down,
                rate_limit_default: b.rate_limit_default,
                rate_limit_max: b.rate_limit_max,
            },
            clock,
        );
        // Keys without a secret never take traffic.
        pool.shared
            .retain(|&i| usable.get(i).copied().unwrap_or(false));
        for idx in pool.pins.values_mut() {
            idx.retain(|&i| usable.get(i).copied().unwrap_or(false));
        }
        pool
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, index: usize) -> &Arc<str> {
        &self.names[index]
    }

    /// How many keys a request of `client` may use (its pinned keys, else the shared ones).
    pub fn choices(&self, client: Option<&str>) -> usize {
        match client.and_then(|c| self.pins.get(c)) {
            Some(idx) => idx.len(),
            None => self.shared.len(),
        }
    }

    /// Choose a key for a request of `client` among those not in `tried`; `None` when every
    /// key it may use was tried (or it may use none), or, when `tried` is not empty, when every
    /// key left is benched.
    pub fn pick(&self, client: Option<&str>, tried: &[usize]) -> Option<Pick> {
        let (allowed, pinned) = match client.and_then(|c| self.pins.get(c)) {
            Some(idx) => (idx.as_slice(), true),
            None => (self.shared.as_slice(), false),
        };
        let now = self.clock.elapsed();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<usize> = None;
        let mut total: i64 = 0;
        for &i in allowed {
            if tried.contains(&i) {
                continue;
            }
            let slot = &mut slots[i];
            if let Breaker::Open { until } = slot.breaker
                && until <= now
            {
                slot.breaker = Breaker::HalfOpen { trial_out: false };
                self.metrics[i].state.set(KeyState::Trial.gauge());
            }
            let eligible = matches!(
                slot.breaker,
                Breaker::Closed { .. } | Breaker::HalfOpen { trial_out: false }
            );
            if !eligible {
                continue;
            }
            let w = if pinned {
                i64::from(self.weights[i].max(1))
            } else {
                i64::from(self.weights[i])
            };
            slot.score += w;
            total += w;
            if best.is_none_or(|b| slots[i].score > slots[b].score) {
                best = Some(i);
            }
        }
        let index = match best {
            Some(b) => {
                slots[b].score -= total;
                b
            }
            // Every key is benched: on a first attempt the one free first serves; a second
            // attempt (after a refusal) only goes to a key that takes traffic.
            None if !tried.is_empty() => return None,
            None => allowed
                .iter()
                .copied()
                .filter(|i| !tried.contains(i))
                .min_by_key(|&i| match slots[i].breaker {
                    Breaker::Open { until } => until,
                    _ => now,
                })?,
        };
        let slot = &mut slots[index];
        let trial = matches!(slot.breaker, Breaker::HalfOpen { trial_out: false });
        if trial {
            slot.breaker = Breaker::HalfOpen { trial_out: true };
        }
        let pick = Pick {
            index,
            name: self.names[index].clone(),
            epoch: slot.epoch,
            trial,
        };
        drop(slots);
        self.metrics[index].requests.increment(1);
        Some(pick)
    }

    /// How the attempt on `pick` ended.
    pub fn report(&self, pick: &Pick, verdict: Verdict) {
        let now = self.clock.elapsed();
        let name = &self.names[pick.index];
        let m = &self.metrics[pick.index];
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut slots[pick.index];
        let stale = pick.epoch != slot.epoch;
        let mut benched: Option<(&'static str, Duration)> = None;
        match verdict {
            Verdict::Nothing => {
                if pick.trial && !stale {
                    slot.breaker = Breaker::HalfOpen { trial_out: false };
                }
            }
            Verdict::Success => {
                if !stale && !matches!(slot.breaker, Breaker::Closed { failures: 0 }) {
                    slot.breaker = Breaker::Closed { failures: 0 };
                    m.state.set(KeyState::Healthy.gauge());
                }
            }
            Verdict::Failure => {
                m.failures.increment(1);
                if !stale {
                    match slot.breaker {
                        Breaker::Closed { failures } if failures + 1 < self.settings.failures => {
                            slot.breaker = Breaker::Closed {
                                failures: failures + 1,
                            };
                        }
                        _ => benched = Some(("failures", self.settings.cool_down)),
                    }
                }
            }
            Verdict::RateLimited(wait) => {
                let wait = wait
                    .unwrap_or(self.settings.rate_limit_default)
                    .min(self.settings.rate_limit_max);
                benched = Some(("rate_limit", wait));
            }
        }
        if let Some((reason, wait)) = benched {
            let until = match slot.breaker {
                // A longer bench already running stays.
                Breaker::Open { until } => until.max(now + wait),
                _ => now + wait,
            };
            slot.breaker = Breaker::Open { until };
            slot.epoch += 1;
            drop(slots);
            m.state.set(KeyState::Benched.gauge());
            match reason {
                "rate_limit" => m.benched_rate_limit.increment(1),
                _ => m.benched_failures.increment(1),
            }
            tracing::warn!(key = %name, reason, bench_ms = wait.as_millis() as u64, "upstream key benched");
        }
    }

    /// Take over the breaker state of the keys of `old` that this pool has too (same name), so
    /// a reload that builds a new pool does not put a benched key back into service early nor
    /// forget a run of failures. Round-robin scores start afresh.
    pub fn inherit(&self, old: &KeyPool) {
        let now = self.clock.elapsed();
        let theirs = old.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut ours = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for (i, name) in self.names.iter().enumerate() {
            let Some(j) = old.names.iter().position(|n| n == name) else {
                continue;
            };
            // A trial out on the old pool is reported there: here the key waits for a new one.
            let breaker = match theirs[j].breaker {
                Breaker::HalfOpen { .. } => Breaker::HalfOpen { trial_out: false },
                other => other,
            };
            ours[i].breaker = breaker;
            let state = match breaker {
                Breaker::Closed { .. } => KeyState::Healthy,
                Breaker::Open { until } if until > now => KeyState::Benched,
                _ => KeyState::Trial,
            };
            self.metrics[i].state.set(state.gauge());
        }
    }

    /// Every key's health now.
    pub fn health(&self) -> Vec<KeyHealth> {
        let now = self.clock.elapsed();
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (state, failures, benched_ms) = match s.breaker {
                    Breaker::Closed { failures } => (KeyState::Healthy, failures, None),
                    Breaker::Open { until } if until > now => {
                        (KeyState::Benched, 0, Some((until - now).as_millis() as u64))
                    }
                    _ => (KeyState::Trial, 0, None),
                };
                KeyHealth {
                    name: self.names[i].to_string(),
                    weight: self.weights[i],
                    state: state.as_str(),
                    failures,
                    benched_ms,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failures: 3,
            cool_down: Duration::from_secs(30),
            rate_limit_default: Duration::from_secs(10),
            rate_limit_max: Duration::from_secs(300),
        }
    }

    fn pool(keys: &[(&str, u32)], pins: &[(&str, &[usize])]) -> (KeyPool, Clock) {
        let clock = Clock::manual(SystemTime::now());
        let pool = KeyPool::new(
            keys.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
            pins.iter()
                .map(|(c, idx)| (c.to_string(), idx.to_vec()))
                .collect(),
            settings(),
            clock.clone(),
        );
        (pool, clock)
    }

    fn counts(pool: &KeyPool, client: Option<&str>, n: usize) -> Vec<usize> {
        let mut c = vec![0; pool.len()];
        for _ in 0..n {
            let p = pool.pick(client, &[]).unwrap();
            c[p.index] += 1;
            pool.report(&p, Verdict::Success);
        }
        c
    }

    #[test]
    fn weights_are_shares_exactly() {
        let (p, _) = pool(&[("a", 3), ("b", 1), ("c", 0)], &[]);
        assert_eq!(counts(&p, None, 400), vec![300, 100, 0]);
        // Smooth: never more than 3 a's in a row.
        let seq: String = (0..8)
            .map(|_| {
                let k = p.pick(None, &[]).unwrap();
                p.report(&k, Verdict::Success);
                k.name.to_string()
            })
            .collect();
        assert_eq!(seq, "aabaaaba");
    }

    #[test]
    fn pinned_clients_use_only_their_keys() {
        let (p, _) = pool(&[("a", 1), ("b", 1), ("team", 0)], &[("t", &[2])]);
        assert_eq!(counts(&p, Some("t"), 10), vec![0, 0, 10]);
        assert_eq!(counts(&p, Some("other"), 10), vec![5, 5, 0]);
        // A pinned key that is benched is still used: the client has no other.
        let k = p.pick(Some("t"), &[]).unwrap();
        p.report(&k, Verdict::RateLimited(None));
        assert_eq!(p.pick(Some("t"), &[]).unwrap().index, 2);
        // Tried already: nothing left.
        assert!(p.pick(Some("t"), &[2]).is_none());
    }

    #[test]
    fn failures_in_a_row_bench_then_one_trial_decides() {
        let (p, clock) = pool(&[("a", 1), ("b", 1)], &[]);
        // A success in between resets the count.
        for v in [Verdict::Failure, Verdict::Failure, Verdict::Success] {
            let k = p.pick(None, &[1]).unwrap();
            p.report(&k, v);
        }
        assert_eq!(p.health()[0].state, "healthy");
        for _ in 0..3 {
            let k = p.pick(None, &[1]).unwrap();
            p.report(&k, Verdict::Failure);
        }
        assert_eq!(p.health()[0].state, "benched");
        assert_eq!(p.health()[0].benched_ms, Some(30_000));
        assert_eq!(counts(&p, None, 10), vec![0, 10]);
        clock.advance(Duration::from_secs(30));
        // One trial, and only one while it is out.
        let trial = p.pick(None, &[1]).unwrap();
        assert_eq!(trial.index, 0);
        assert_eq!(p.health()[0].state, "trial");
        assert_eq!(counts(&p, None, 4), vec![0, 4]);
        // The trial fails: benched again for a whole cool-down.
        p.report(&trial, Verdict::Failure);
        assert_eq!(p.health()[0].benched_ms, Some(30_000));
        clock.advance(Duration::from_secs(30));
        let trial = p.pick(None, &[1]).unwrap();
        p.report(&trial, Verdict::Success);
        assert_eq!(p.health()[0].state, "healthy");
        assert_eq!(counts(&p, None, 10), vec![5, 5]);
    }

    #[test]
    fn an_abandoned_trial_is_given_back_and_stale_reports_are_ignored() {
        let (p, clock) = pool(&[("a", 1)], &[]);
        let before = p.pick(None, &[]).unwrap();
        let k = p.pick(None, &[]).unwrap();
        p.report(&k, Verdict::RateLimited(Some(Duration::from_secs(2))));
        // A success of a request picked before the bench does not lift it.
        p.report(&before, Verdict::Success);
        assert_eq!(p.health()[0].state, "benched");
        clock.advance(Duration::from_secs(2));
        let trial = p.pick(None, &[]).unwrap();
        p.report(&trial, Verdict::Nothing);
        let again = p.pick(None, &[]).unwrap();
        assert_eq!(p.health()[0].state, "trial");
        p.report(&again, Verdict::Success);
        assert_eq!(p.health()[0].state, "healthy");
    }

    #[test]
    fn rate_limit_benches_for_the_time_given_capped() {
        let (p, _) = pool(&[("a", 1), ("b", 1)], &[]);
        let k = p.pick(None, &[1]).unwrap();
        p.report(&k, Verdict::RateLimited(Some(Duration::from_millis(1500))));
        assert_eq!(p.health()[0].benched_ms, Some(1500));
        let k = p.pick(None, &[0]).unwrap();
        p.report(&k, Verdict::RateLimited(Some(Duration::from_secs(86_400))));
        assert_eq!(p.health()[1].benched_ms, Some(300_000));
        // Both benched: the one free first serves.
        assert_eq!(p.pick(None, &[]).unwrap().index, 0);
    }

    #[test]
    fn a_new_pool_inherits_the_breakers_of_the_keys_it_keeps() {
        let (old, clock) = pool(&[("a", 1), ("b", 1)], &[]);
        let k = old.pick(None, &[1]).unwrap();
        old.report(&k, Verdict::RateLimited(Some(Duration::from_secs(5))));
        let k = old.pick(None, &[0]).unwrap();
        old.report(&k, Verdict::Failure);
        let new = KeyPool::new(
            vec![("b".into(), 1), ("c".into(), 1), ("a".into(), 1)],
            HashMap::new(),
            settings(),
            clock.clone(),
        );
        new.inherit(&old);
        let h = new.health();
        assert_eq!((h[0].state, h[0].failures), ("healthy", 1));
        assert_eq!(h[1].state, "healthy");
        assert_eq!((h[2].state, h[2].benched_ms), ("benched", Some(5_000)));
        assert_eq!(counts(&new, None, 4), vec![2, 2, 0]);
    }

    /// Smooth weighted round-robin gives each key exactly its share over whole rounds, on one
    /// thread and under four; the cost of choosing a key and reporting the answer is printed
    /// (`--nocapture`), never asserted.
    #[test]
    fn selection_overhead() {
        let (p, _) = pool(&[("a", 5), ("b", 3), ("c", 1), ("d", 1)], &[]);
        let n = 200_000u32;
        let mut counts = [0u32; 4];
        let start = std::time::Instant::now();
        for _ in 0..n {
            let k = p.pick(None, &[]).unwrap();
            counts[k.index] += 1;
            p.report(&k, Verdict::Success);
        }
        let single = start.elapsed() / n;
        assert_eq!(
            counts,
            [n / 2, n * 3 / 10, n / 10, n / 10],
            "shares 5:3:1:1"
        );
        let p = Arc::new(p);
        let start = std::time::Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut counts = [0u32; 4];
                    for _ in 0..n / 4 {
                        let k = p.pick(None, &[]).unwrap();
                        counts[k.index] += 1;
                        p.report(&k, Verdict::Success);
                    }
                    counts
                })
            })
            .collect();
        let mut counts = [0u32; 4];
        for t in threads {
            for (all, one) in counts.iter_mut().zip(t.join().unwrap()) {
                *all += one;
            }
        }
        let contended = start.elapsed() / n;
        assert_eq!(
            counts,
            [n / 2, n * 3 / 10, n / 10, n / 10],
            "shares 5:3:1:1 under contention"
        );
        eprintln!(
            "key selection (pick + report, 4 keys): {single:?} per request on one thread, {contended:?} per request (wall) with 4 threads"
        );
    }
}
