//! The encoder embedding cache: projected audio embeddings keyed by the audio's content, bounded in bytes,
//! least recently used first out. A follow-up question about the same recording skips decoding, the front
//! end and the encoder entirely.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::Tensor;

/// Identity of one audio input: blake3 of its encoded bytes and of the options that change its embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AudioKey(pub [u8; 32]);

impl AudioKey {
    pub fn of(bytes: &[u8], truncate: bool) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(if truncate { b"truncate" } else { b"reject__" });
        h.update(bytes);
        AudioKey(*h.finalize().as_bytes())
    }

    /// The prefix-cache identity of audio row `row` of this audio (high bit set: never a token id).
    pub fn token_key(&self, row: usize) -> u64 {
        let mut h = blake3::Hasher::new();
        h.update(&self.0);
        h.update(&(row as u64).to_le_bytes());
        let b = h.finalize();
        u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes")) | (1 << 63)
    }
}

/// The encoder's result for one audio.
#[derive(Debug)]
pub struct AudioEmbeds {
    /// `[tokens, hidden]` in the model's dtype, on its device.
    pub rows: Tensor,
    pub tokens: usize,
    pub windows: usize,
    pub seconds: f64,
}

impl AudioEmbeds {
    pub fn bytes(&self) -> usize {
        self.rows.elem_count() * self.rows.dtype().size_in_bytes()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub capacity_bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug)]
pub struct EmbeddingCache {
    capacity: usize,
    bytes: usize,
    map: HashMap<AudioKey, (Arc<AudioEmbeds>, u64)>,
    lru: BTreeMap<u64, AudioKey>,
    tick: u64,
    hits: u64,
    misses: u64,
}

impl EmbeddingCache {
    pub fn new(capacity_bytes: usize) -> Self {
        EmbeddingCache {
            capacity: capacity_bytes,
            bytes: 0,
            map: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// Looks `key` up and counts the hit or miss (once per audio part of a request).
    pub fn get(&mut self, key: &AudioKey) -> Option<Arc<AudioEmbeds>> {
        let r = self.take(key);
        match r {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        r
    }

    /// Looks `key` up again without counting (a second look after the first miss).
    pub fn recheck(&mut self, key: &AudioKey) -> Option<Arc<AudioEmbeds>> {
        self.take(key)
    }

    fn take(&mut self, key: &AudioKey) -> Option<Arc<AudioEmbeds>> {
        self.tick += 1;
        let tick = self.tick;
        match self.map.get_mut(key) {
            Some((e, t)) => {
                self.lru.remove(t);
                *t = tick;
                self.lru.insert(tick, *key);
                Some(e.clone())
            }
            None => None,
        }
    }

    /// Inserts (an entry larger than the whole cache is not kept), evicting the least recently used.
    pub fn insert(&mut self, key: AudioKey, e: Arc<AudioEmbeds>) {
        let size = e.bytes();
        if size > self.capacity || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + size > self.capacity {
            let Some((&t, &old)) = self.lru.iter().next() else {
                break;
            };
            self.lru.remove(&t);
            if let Some((o, _)) = self.map.remove(&old) {
                self.bytes -= o.bytes();
            }
        }
        self.tick += 1;
        self.lru.insert(self.tick, key);
        self.map.insert(key, (e, self.tick));
        self.bytes += size;
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.map.len(),
            bytes: self.bytes,
            capacity_bytes: self.capacity,
            hits: self.hits,
            misses: self.misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn entry(rows: usize) -> Arc<AudioEmbeds> {
        Arc::new(AudioEmbeds {
            rows: Tensor::zeros((rows, 4), DType::F32, &Device::Cpu).unwrap(),
            tokens: rows,
            windows: 1,
            seconds: 1.0,
        })
    }

    #[test]
    fn bounded_in_bytes_lru_first_out() {
        // 3 entries of 16 rows x 4 f32 = 256 bytes each; capacity holds two.
        let mut c = EmbeddingCache::new(600);
        let k = |i: u8| AudioKey::of(&[i], false);
        c.insert(k(1), entry(16));
        c.insert(k(2), entry(16));
        assert!(c.get(&k(1)).is_some()); // 1 is now the most recent
        c.insert(k(3), entry(16));
        assert!(c.get(&k(2)).is_none(), "least recently used is evicted");
        assert!(c.get(&k(1)).is_some());
        assert!(c.get(&k(3)).is_some());
        assert!(c.stats().bytes <= 600);
        c.insert(k(4), entry(1000));
        assert!(c.get(&k(4)).is_none(), "larger than the cache: not kept");
        assert_ne!(AudioKey::of(&[1], false), AudioKey::of(&[1], true));
        assert_ne!(k(1).token_key(0), k(1).token_key(1));
        assert!(k(1).token_key(0) >= 1 << 63);
    }
}
