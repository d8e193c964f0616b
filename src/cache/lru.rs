//! A least-recently-used map bounded in bytes. Plain data structure (no lock, no clock), so the
//! eviction rules are unit-tested directly; [`super::ResponseCache`] puts one lock around it.
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// What one insertion did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub stored: bool,
    pub evicted: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    bytes: usize,
    tick: u64,
}

/// Entries by key, each with its size; `order` finds the least recently used one in O(log n).
#[derive(Debug)]
pub struct ByteLru<K, V> {
    capacity: usize,
    used: usize,
    next_tick: u64,
    map: HashMap<K, Slot<V>>,
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V: Clone> ByteLru<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            next_tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The value under `key`, which becomes the most recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        let tick = self.tick();
        let slot = self.map.get_mut(key)?;
        let key = self.order.remove(&slot.tick)?;
        slot.tick = tick;
        self.order.insert(tick, key);
        Some(slot.value.clone())
    }

    /// Stores `value` of `bytes` under `key`, evicting least recently used entries until it fits.
    /// An entry larger than the whole capacity is not stored (and evicts nothing).
    pub fn insert(&mut self, key: K, value: V, bytes: usize) -> Inserted {
        if bytes > self.capacity {
            return Inserted::default();
        }
        self.remove(&key);
        let mut evicted = 0;
        while self.used + bytes > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.map.remove(&oldest) {
                self.used -= slot.bytes;
                evicted += 1;
            }
        }
        let tick = self.tick();
        self.order.insert(tick, key.clone());
        self.map.insert(key, Slot { value, bytes, tick });
        self.used += bytes;
        Inserted {
            stored: true,
            evicted,
        }
    }

    fn remove(&mut self, key: &K) {
        if let Some(slot) = self.map.remove(key) {
            self.order.remove(&slot.tick);
            self.used -= slot.bytes;
        }
    }

    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_first_and_stays_within_bytes() {
        let mut lru = ByteLru::new(100);
        assert!(lru.insert("a", 1, 40).stored);
        assert!(lru.insert("b", 2, 40).stored);
        assert_eq!(lru.get(&"a"), Some(1)); // "b" is now the oldest
        let r = lru.insert("c", 3, 40);
        assert_eq!(
            r,
            Inserted {
                stored: true,
                evicted: 1
            }
        );
        assert_eq!(lru.get(&"b"), None);
        assert_eq!((lru.get(&"a"), lru.get(&"c")), (Some(1), Some(3)));
        assert_eq!((lru.len(), lru.used()), (2, 80));
    }

    #[test]
    fn an_entry_larger_than_the_capacity_is_not_stored() {
        let mut lru = ByteLru::new(100);
        lru.insert("a", 1, 60);
        assert_eq!(lru.insert("big", 2, 101), Inserted::default());
        assert_eq!((lru.get(&"a"), lru.len(), lru.used()), (Some(1), 1, 60));
    }

    #[test]
    fn reinserting_a_key_replaces_it() {
        let mut lru = ByteLru::new(100);
        lru.insert("a", 1, 60);
        assert_eq!(
            lru.insert("a", 2, 70),
            Inserted {
                stored: true,
                evicted: 0
            }
        );
        assert_eq!((lru.get(&"a"), lru.len(), lru.used()), (Some(2), 1, 70));
    }

    #[test]
    fn one_large_entry_evicts_as_many_as_needed() {
        let mut lru = ByteLru::new(100);
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            lru.insert(k, i, 25);
        }
        assert_eq!(lru.insert("e", 9, 90).evicted, 4);
        assert_eq!((lru.len(), lru.used()), (1, 90));
    }
}
