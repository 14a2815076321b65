//! The activation cache: token sequence → `Arc<HiddenStates>` (with the backend's KV cache),
//! for one model, under a byte budget with LRU eviction.
//!
//! - Single flight: each key has a slot whose `OnceLock` runs the forward pass once; a second
//!   request for the same tokens blocks on it (on a blocking thread, never on the runtime)
//!   and shares the result.
//! - Prefix reuse: a miss looks for the completed entry with the longest common prefix and
//!   runs `Backend::forward_reusing` on it, so an append or an edit costs the tokens from the
//!   first changed one. The scan is linear over the entries; the budget keeps them few (a
//!   256-token prompt of the default model takes ~30 MB, so 512 MB holds ~17).
//! - No map guard is held across a forward pass: slots are cloned out of the map first.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dashmap::DashMap;
use lens_core::{Backend, CaptureOptions, HiddenStates, Stop};
use serde::Serialize;

type Computed = Result<Arc<HiddenStates>, Arc<lens_core::Error>>;

struct Slot {
    cell: OnceLock<Computed>,
    /// Set when a request starts computing this entry (inside the once-cell).
    flying: AtomicBool,
    bytes: AtomicUsize,
    last_used: AtomicU64,
}

/// `lens/cacheStats`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub budget_bytes: usize,
    pub hits: u64,
    /// Requests that waited for another request's computation of the same tokens (single
    /// flight) instead of computing them again.
    pub waits: u64,
    pub misses: u64,
    pub tokens_reused: u64,
    pub tokens_computed: u64,
}

pub struct ActivationCache {
    map: DashMap<Arc<[u32]>, Arc<Slot>>,
    budget: usize,
    bytes: AtomicUsize,
    clock: AtomicU64,
    hits: AtomicU64,
    waits: AtomicU64,
    misses: AtomicU64,
    tokens_reused: AtomicU64,
    tokens_computed: AtomicU64,
    evicting: Mutex<()>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl ActivationCache {
    pub fn new(budget: usize) -> Self {
        ActivationCache {
            map: DashMap::new(),
            budget,
            bytes: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            tokens_reused: AtomicU64::new(0),
            tokens_computed: AtomicU64::new(0),
            evicting: Mutex::new(()),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The states of `ids`, from the cache or computed (reusing the longest cached prefix).
    /// Blocks: call it from a blocking thread. A computation that `stop` ends is not kept; a
    /// request that was waiting for it, and was not stopped itself, computes again.
    pub fn get(
        &self,
        backend: &dyn Backend,
        ids: &[u32],
        stop: &Stop,
    ) -> Result<Arc<HiddenStates>, Arc<lens_core::Error>> {
        loop {
            match self.get_once(backend, ids, stop) {
                Err(e) if matches!(*e, lens_core::Error::Stopped) && !stop.is_stopped() => {}
                other => return other,
            }
        }
    }

    fn get_once(
        &self,
        backend: &dyn Backend,
        ids: &[u32],
        stop: &Stop,
    ) -> Result<Arc<HiddenStates>, Arc<lens_core::Error>> {
        let key: Arc<[u32]> = ids.into();
        // The entry guard lives only for this statement.
        let slot = self
            .map
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Slot::new()))
            .value()
            .clone();
        slot.last_used.store(self.tick(), Ordering::Relaxed);
        let mut computed_here = false;
        if slot.cell.get().is_none() && slot.flying.load(Ordering::Acquire) {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        let result = slot.cell.get_or_init(|| {
            computed_here = true;
            slot.flying.store(true, Ordering::Release);
            self.compute(backend, ids, stop)
        });
        match result {
            Ok(states) => {
                if computed_here {
                    let bytes = states.activation_bytes() + backend.state_bytes(states);
                    slot.bytes.store(bytes, Ordering::Relaxed);
                    self.bytes.fetch_add(bytes, Ordering::Relaxed);
                    self.evict(&key);
                } else {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok(states.clone())
            }
            Err(e) => {
                if computed_here {
                    self.map.remove_if(&key, |_, s| Arc::ptr_eq(s, &slot));
                }
                Err(e.clone())
            }
        }
    }

    fn compute(&self, backend: &dyn Backend, ids: &[u32], stop: &Stop) -> Computed {
        self.misses.fetch_add(1, Ordering::Relaxed);
        // The completed entry sharing the longest prefix; the iterator (and its shard read
        // guards) is dropped before the forward pass.
        let best = {
            let mut best: Option<(usize, Arc<HiddenStates>)> = None;
            for entry in self.map.iter() {
                let common = common_prefix(entry.key(), ids);
                if common == 0 || best.as_ref().is_some_and(|(b, _)| *b >= common) {
                    continue;
                }
                if let Some(Ok(states)) = entry.value().cell.get() {
                    best = Some((common, states.clone()));
                }
            }
            best
        };
        let n = ids.len();
        let states = match best {
            Some((common, prefix)) => {
                // A backend recomputes from the first differing token; a prompt that is a
                // prefix of a cached one needs no computation at all.
                let reused = common.min(n);
                let states = backend
                    .forward_until(Some(&prefix), ids, CaptureOptions::default(), stop)
                    .map_err(Arc::new)?;
                self.tokens_reused
                    .fetch_add(reused as u64, Ordering::Relaxed);
                self.tokens_computed
                    .fetch_add((n - reused) as u64, Ordering::Relaxed);
                states
            }
            None => {
                let states = backend
                    .forward_until(None, ids, CaptureOptions::default(), stop)
                    .map_err(Arc::new)?;
                self.tokens_computed.fetch_add(n as u64, Ordering::Relaxed);
                states
            }
        };
        Ok(Arc::new(states))
    }

    /// Drop least recently used completed entries until the total is within the budget. The
    /// entry just computed goes last; if it alone exceeds the budget it is not kept.
    fn evict(&self, newest: &Arc<[u32]>) {
        let Ok(_guard) = self.evicting.lock() else {
            return;
        };
        while self.bytes.load(Ordering::Relaxed) > self.budget {
            let victim = self
                .map
                .iter()
                .filter(|e| e.value().cell.get().is_some_and(|r| r.is_ok()))
                .map(|e| {
                    (
                        e.key() != newest,
                        e.value().last_used.load(Ordering::Relaxed),
                        e.key().clone(),
                    )
                })
                // Others before the newest, then oldest first.
                .min_by_key(|(other, used, _)| (!*other, *used))
                .map(|(_, _, key)| key);
            let Some(key) = victim else { break };
            if let Some((_, slot)) = self.map.remove(&key) {
                self.bytes
                    .fetch_sub(slot.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self
                .map
                .iter()
                .filter(|e| e.value().cell.get().is_some_and(|r| r.is_ok()))
                .count(),
            bytes: self.bytes.load(Ordering::Relaxed),
            budget_bytes: self.budget,
            hits: self.hits.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            tokens_reused: self.tokens_reused.load(Ordering::Relaxed),
            tokens_computed: self.tokens_computed.load(Ordering::Relaxed),
        }
    }
}

impl Slot {
    fn new() -> Self {
        Slot {
            cell: OnceLock::new(),
            flying: AtomicBool::new(false),
            bytes: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
        }
    }
}
