//! The validated-image cache: people edit the same picture again and again with new prompts, so
//! a file whose SHA-256 passed the checks recently, under the same rules and in the same role,
//! is not decoded again.
//!
//! - Key: the SHA-256 of the file bytes as received, a fingerprint of the rules that judged it
//!   ([`fingerprint`]: a hash of the rule struct's `Debug`, so any limit or policy change
//!   misses) and the [`Role`] (profile and part; for a dall-e-2 image whether a mask came with
//!   it, for a gpt-image input the format it was checked as).
//! - Value: what the check learned of the file alone ([`Validated`]: format, dimensions, mode).
//!   Only files that passed *unchanged* are stored: a refusal is recomputed every time (no
//!   poisoning questions), and a file the check converted (a tRNS PNG re-encoded as RGBA) is
//!   not stored at all, so no image bytes are ever held. Facts of one request (the mask against
//!   the image's size) are never stored: the caller compares the cached dimensions again.
//! - Bounds: `cache.validated_images_max_entries` and `cache.validated_images_max_bytes`
//!   (keys + values + the LRU bookkeeping, a fixed [`ENTRY_BYTES`] per entry), least recently
//!   used first out; an entry is good for `cache.validated_images_ttl` from its validation (a
//!   hit does not extend it). Either bound or the TTL at 0 turns the cache off.
//! - One mutex around a hash map and an ordered index of last use: O(log n) per operation,
//!   held for a few hundred nanoseconds by the blocking-pool threads that run the checks.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;
use crate::edit::sniff::ImageFormat;

/// The part a file played and the profile that checked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// dall-e-2 `image`; with a mask fewer rules apply, so the two never share an entry.
    DallE2Image {
        has_mask: bool,
    },
    DallE2Mask,
    /// gpt-image input image, checked as this format.
    GptImage(ImageFormat),
    GptMask,
    GptMarkup,
}

/// What the check of one file, alone, found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validated {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// Pillow mode of a dall-e-2 PNG (`""` for the gpt-image profile).
    pub mode: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    sha256: [u8; 32],
    rules: u64,
    role: Role,
}

impl Key {
    pub fn new(sha256: [u8; 32], rules: u64, role: Role) -> Key {
        Key {
            sha256,
            rules,
            role,
        }
    }
}

struct Slot {
    value: Validated,
    /// Clock time (since the clock was made) after which the entry is stale.
    expires: Duration,
    /// Its key in `Inner::order`.
    used: u64,
}

/// Bytes one entry holds: its key and value in the map, and its key again in the LRU index.
pub const ENTRY_BYTES: usize =
    std::mem::size_of::<Key>() + std::mem::size_of::<Slot>() + std::mem::size_of::<(u64, Key)>();

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Slot>,
    /// Last-use tick → key; the first entry is the least recently used.
    order: BTreeMap<u64, Key>,
    tick: u64,
}

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(slot) = self.map.remove(key) {
            self.order.remove(&slot.used);
        }
    }
}

/// The bounds (`[cache]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub ttl: Duration,
}

pub struct ValidatedCache {
    /// `None`: off.
    inner: Option<Mutex<Inner>>,
    max_entries: usize,
    ttl: Duration,
    clock: Clock,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The fingerprint of a rule set: a hash of its `Debug` form (every field, names included), so
/// a changed limit or policy is a different key. Stable within one process, which is all an
/// in-memory cache needs.
pub fn fingerprint(rules: &impl std::fmt::Debug) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    format!("{rules:?}").hash(&mut h);
    h.finish()
}

impl ValidatedCache {
    pub fn new(limits: CacheLimits, clock: Clock) -> ValidatedCache {
        let max_entries = limits.max_entries.min(limits.max_bytes / ENTRY_BYTES);
        let on = max_entries > 0 && !limits.ttl.is_zero();
        ValidatedCache {
            inner: on.then(|| Mutex::new(Inner::default())),
            max_entries,
            ttl: limits.ttl,
            clock,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// A cache that stores nothing.
    pub fn off() -> ValidatedCache {
        ValidatedCache::new(
            CacheLimits {
                max_entries: 0,
                max_bytes: 0,
                ttl: Duration::ZERO,
            },
            Clock::system(),
        )
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The entry for `key` if it is there and fresh (counted as a hit or a miss; nothing is
    /// counted when the cache is off).
    pub fn get(&self, key: &Key) -> Option<Validated> {
        let inner = self.inner.as_ref()?;
        let now = self.clock.elapsed();
        let found = {
            let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
            let inner = &mut *g;
            match inner.map.get_mut(key) {
                Some(slot) if slot.expires > now => {
                    inner.tick += 1;
                    inner.order.remove(&slot.used);
                    slot.used = inner.tick;
                    inner.order.insert(inner.tick, *key);
                    Some(slot.value)
                }
                Some(_) => {
                    inner.remove(key);
                    None
                }
                None => None,
            }
        };
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("imagegate_validation_cache_hits_total").increment(1);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("imagegate_validation_cache_misses_total").increment(1);
        }
        found
    }

    /// Whether a fresh entry for `key` is there, without counting a hit or a miss and without
    /// touching its place in the eviction order (cut-through asks before the check, which then
    /// asks again with [`ValidatedCache::get`]).
    pub fn contains(&self, key: &Key) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        let now = self.clock.elapsed();
        let g = inner.lock().unwrap_or_else(|e| e.into_inner());
        g.map.get(key).is_some_and(|slot| slot.expires > now)
    }

    /// Store a file that passed unchanged; the least recently used entries make room.
    pub fn insert(&self, key: Key, value: Validated) {
        let Some(inner) = &self.inner else { return };
        let expires = self.clock.elapsed() + self.ttl;
        let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        inner.remove(&key);
        inner.tick += 1;
        let used = inner.tick;
        inner.order.insert(used, key);
        inner.map.insert(
            key,
            Slot {
                value,
                expires,
                used,
            },
        );
        while inner.map.len() > self.max_entries {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.map.remove(&oldest);
        }
    }

    /// Entries held now (stale ones included until touched or pushed out).
    pub fn len(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.lock().unwrap_or_else(|e| e.into_inner()).map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the entries hold now (keys, values and bookkeeping).
    pub fn bytes(&self) -> usize {
        self.len() * ENTRY_BYTES
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn limits(max_entries: usize) -> CacheLimits {
        CacheLimits {
            max_entries,
            max_bytes: usize::MAX,
            ttl: Duration::from_secs(600),
        }
    }

    fn key(n: u8) -> Key {
        Key::new([n; 32], 7, Role::DallE2Image { has_mask: false })
    }

    fn value(n: u32) -> Validated {
        Validated {
            format: ImageFormat::Png,
            width: n,
            height: n,
            mode: "RGBA",
        }
    }

    fn manual() -> Clock {
        Clock::manual(SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn a_stored_file_is_a_hit_and_an_unknown_one_a_miss() {
        let c = ValidatedCache::new(limits(10), manual());
        assert_eq!(c.get(&key(1)), None);
        c.insert(key(1), value(1024));
        assert_eq!(c.get(&key(1)), Some(value(1024)));
        assert_eq!(c.get(&key(2)), None);
        assert_eq!((c.hits(), c.misses()), (1, 2));
    }

    #[test]
    fn other_rules_or_another_role_miss() {
        let c = ValidatedCache::new(limits(10), manual());
        let rules_a = fingerprint(&("max_bytes", 4_194_304));
        let rules_b = fingerprint(&("max_bytes", 4_194_305));
        assert_ne!(rules_a, rules_b);
        assert_eq!(rules_a, fingerprint(&("max_bytes", 4_194_304)));
        c.insert(
            Key::new([1; 32], rules_a, Role::DallE2Image { has_mask: true }),
            value(1),
        );
        assert!(
            c.get(&Key::new(
                [1; 32],
                rules_b,
                Role::DallE2Image { has_mask: true }
            ))
            .is_none()
        );
        assert!(
            c.get(&Key::new(
                [1; 32],
                rules_a,
                Role::DallE2Image { has_mask: false }
            ))
            .is_none()
        );
        assert!(
            c.get(&Key::new([1; 32], rules_a, Role::DallE2Mask))
                .is_none()
        );
        assert!(
            c.get(&Key::new(
                [1; 32],
                rules_a,
                Role::DallE2Image { has_mask: true }
            ))
            .is_some()
        );
    }

    #[test]
    fn entries_expire_after_the_ttl_from_validation() {
        let clock = manual();
        let c = ValidatedCache::new(limits(10), clock.clone());
        c.insert(key(1), value(1));
        clock.advance(Duration::from_secs(599));
        // A hit does not extend the entry's life.
        assert!(c.get(&key(1)).is_some());
        clock.advance(Duration::from_secs(1));
        assert!(c.get(&key(1)).is_none());
        assert_eq!(c.len(), 0, "a stale entry is dropped when found");
        c.insert(key(1), value(1));
        clock.advance(Duration::from_secs(599));
        assert!(c.get(&key(1)).is_some());
    }

    #[test]
    fn the_least_recently_used_entry_makes_room() {
        let c = ValidatedCache::new(limits(3), manual());
        for n in 1..=3 {
            c.insert(key(n), value(u32::from(n)));
        }
        // 1 used again: 2 is now the least recently used.
        assert!(c.get(&key(1)).is_some());
        c.insert(key(4), value(4));
        assert_eq!(c.len(), 3);
        assert!(c.get(&key(2)).is_none());
        for n in [1, 3, 4] {
            assert!(c.get(&key(n)).is_some(), "entry {n}");
        }
        // Storing a key again replaces it without growing.
        c.insert(key(4), value(40));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&key(4)), Some(value(40)));
    }

    #[test]
    fn the_byte_bound_caps_the_entries() {
        let c = ValidatedCache::new(
            CacheLimits {
                max_entries: 1000,
                max_bytes: 5 * ENTRY_BYTES + ENTRY_BYTES / 2,
                ttl: Duration::from_secs(600),
            },
            manual(),
        );
        for n in 0..20 {
            c.insert(key(n), value(1));
            assert!(c.bytes() <= 5 * ENTRY_BYTES + ENTRY_BYTES / 2);
        }
        assert_eq!(c.len(), 5);
        assert!(c.get(&key(19)).is_some());
        assert!(c.get(&key(14)).is_none());
    }

    #[test]
    fn zero_turns_it_off() {
        for l in [
            CacheLimits {
                max_entries: 0,
                ..limits(0)
            },
            CacheLimits {
                max_bytes: 0,
                ..limits(10)
            },
            CacheLimits {
                ttl: Duration::ZERO,
                ..limits(10)
            },
        ] {
            let c = ValidatedCache::new(l, manual());
            assert!(!c.is_on());
            c.insert(key(1), value(1));
            assert_eq!(c.get(&key(1)), None);
            assert_eq!((c.len(), c.hits(), c.misses()), (0, 0, 0));
        }
    }

    #[test]
    fn shared_between_threads() {
        let c = std::sync::Arc::new(ValidatedCache::new(limits(64), manual()));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for n in 0..200u8 {
                        let k = key(n.wrapping_mul(4).wrapping_add(t));
                        c.insert(k, value(1));
                        let _ = c.get(&k);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        assert!(c.len() <= 64);
        assert_eq!(c.hits() + c.misses(), 800);
    }
}
