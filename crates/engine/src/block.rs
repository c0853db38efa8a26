//! The paged KV cache's bookkeeping: fixed-size blocks, reference counts, a free list and the prefix cache.
//!
//! Pure logic: block ids index the model's [`afnext_model::paged::PagedKv`] pool, nothing here touches
//! tensors.
//!
//! * A block is *used* while some sequence's block table holds it (`ref_count > 0`).
//! * A full block whose content is known gets a [`BlockKey`] (a hash chained over every token before it and
//!   its own tokens) and is entered in the prefix cache. When its last user releases it, it stays cached
//!   ("evictable") until the space is needed; a later prompt with the same prefix takes it back instead of
//!   recomputing it.
//! * Allocation takes a never-cached free block first, then evicts the least recently released cached one.
//! * A cached block is also found by a prompt that shares only its first positions (same prefix before it,
//!   then some of its tokens, then different ones): [`BlockManager::partial`] gives the cached block with the
//!   longest such run, whose rows the engine copies into a block of the new sequence's own (copy on write),
//!   so that a chat template or a previous turn ending inside a block is not recomputed either.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Index of a block in the KV pool.
pub type BlockId = u32;

/// Identity of a full block's content, chained over the whole prefix (blake3, 256 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey([u8; 32]);

/// What [`BlockManager::children`] files the first blocks of sequences under (no hash gives all zeros).
const ROOT: BlockKey = BlockKey([0; 32]);

impl BlockKey {
    /// The key of a block with `tokens` (their [`crate::TokenKey`]s) following the block `parent`.
    pub fn new(parent: Option<&BlockKey>, tokens: &[u64]) -> Self {
        let mut h = blake3::Hasher::new();
        match parent {
            Some(p) => h.update(&p.0),
            None => h.update(b"afnext-root"),
        };
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        BlockKey(*h.finalize().as_bytes())
    }
}

/// Counters of the block pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// Not held, content cached for reuse (counts as available).
    pub cached: usize,
    /// Not held, no content.
    pub free: usize,
    /// Prompt blocks looked up / found in the prefix cache, since start.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Cached blocks whose first positions a prompt shared (copied, not recomputed), and those positions.
    pub partial_hits: u64,
    pub partial_positions: u64,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_count: Vec<u32>,
    key: Vec<Option<BlockKey>>,
    free: VecDeque<BlockId>,
    cached: HashMap<BlockKey, BlockId>,
    /// Per cached block: the key of the block before it ([`ROOT`] for a first block) and its token keys.
    content: Vec<Option<(BlockKey, Vec<u64>)>>,
    /// Cached blocks by the key of the block before them and their first token key (a template's last
    /// block before the requests part can have thousands of children; their first tokens tell them apart).
    children: HashMap<(BlockKey, u64), Vec<BlockId>>,
    /// Released cached blocks by release order (oldest first), for LRU eviction.
    evictable: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    tick: u64,
    prefix_queries: u64,
    prefix_hits: u64,
    partial_hits: u64,
    partial_positions: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            ref_count: vec![0; num_blocks],
            key: vec![None; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            cached: HashMap::new(),
            content: vec![None; num_blocks],
            children: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            tick: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            partial_hits: 0,
            partial_positions: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn stats(&self) -> BlockStats {
        let total = self.num_blocks();
        BlockStats {
            total,
            used: total - self.available(),
            cached: self.evictable.len(),
            free: self.free.len(),
            prefix_queries: self.prefix_queries,
            prefix_hits: self.prefix_hits,
            partial_hits: self.partial_hits,
            partial_positions: self.partial_positions,
        }
    }

    /// A block for new content (reference count 1), or `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (&t, &b) = self.evictable.iter().next()?;
                self.evictable.remove(&t);
                if let Some(k) = self.key[b as usize].take() {
                    self.cached.remove(&k);
                }
                if let Some((parent, tokens)) = self.content[b as usize].take() {
                    let at = (parent, tokens[0]);
                    if let Some(list) = self.children.get_mut(&at) {
                        list.retain(|&c| c != b);
                        if list.is_empty() {
                            self.children.remove(&at);
                        }
                    }
                }
                b
            }
        };
        debug_assert_eq!(self.ref_count[b as usize], 0);
        self.ref_count[b as usize] = 1;
        Some(b)
    }

    /// Takes a reference on the cached block with this content, if any.
    pub fn lookup(&mut self, key: &BlockKey) -> Option<BlockId> {
        self.prefix_queries += 1;
        let b = *self.cached.get(key)?;
        self.prefix_hits += 1;
        self.take(b);
        Some(b)
    }

    /// One more reference on `b` (out of the evictable set if it was there).
    fn take(&mut self, b: BlockId) {
        if self.ref_count[b as usize] == 0 {
            self.evictable.remove(&self.released_at[b as usize]);
        }
        self.ref_count[b as usize] += 1;
    }

    /// The cached block after `parent` (`None`: a sequence's first block) whose tokens begin with the longest
    /// run of `tokens` (at least one, fewer than a block), and that run's length; takes a reference on it,
    /// which the caller releases once its rows are copied. `None` when no cached block shares a first token.
    pub fn partial(
        &mut self,
        parent: Option<&BlockKey>,
        tokens: &[u64],
    ) -> Option<(BlockId, usize)> {
        let first = *tokens.first()?;
        let list = self.children.get(&(*parent.unwrap_or(&ROOT), first))?;
        let mut best: Option<(BlockId, usize)> = None;
        for &b in list {
            let Some((_, have)) = &self.content[b as usize] else {
                continue;
            };
            let n = have.iter().zip(tokens).take_while(|(a, b)| a == b).count();
            if n > best.map_or(0, |(_, m)| m) {
                best = Some((b, n));
                if n == tokens.len() {
                    break;
                }
            }
        }
        let (b, n) = best?;
        let n = n.min(self.block_size - 1);
        self.partial_hits += 1;
        self.partial_positions += n as u64;
        self.take(b);
        Some((b, n))
    }

    /// Records that `block` (held by the caller) now holds the full content `key`: `tokens` after the block
    /// whose key is `parent`. If another block already holds that content, this one simply stays uncached.
    pub fn register(
        &mut self,
        block: BlockId,
        key: BlockKey,
        parent: Option<&BlockKey>,
        tokens: &[u64],
    ) {
        if self.key[block as usize].is_some() || self.cached.contains_key(&key) {
            return;
        }
        debug_assert_eq!(tokens.len(), self.block_size, "only full blocks are cached");
        self.key[block as usize] = Some(key);
        self.cached.insert(key, block);
        self.file(block, parent, tokens);
    }

    /// Files `tokens` (at least one) after `parent` as `block`'s content, where [`Self::partial`] looks.
    fn file(&mut self, block: BlockId, parent: Option<&BlockKey>, tokens: &[u64]) {
        let parent = *parent.unwrap_or(&ROOT);
        self.content[block as usize] = Some((parent, tokens.to_vec()));
        self.children
            .entry((parent, tokens[0]))
            .or_default()
            .push(block);
    }

    /// Files the first positions of a block that will not fill: its sequence is leaving (finished, cancelled,
    /// preempted) and the caller's reference is its last. The block then stays in the cache like a full one,
    /// but only [`Self::partial`] finds it: a follow-up turn whose prompt repeats the first turn's answer
    /// copies the answer's last positions instead of recomputing them. `tokens` (fewer than a block) follow
    /// the block whose key is `parent`, and their keys and values must be in the block's first rows.
    pub fn remember_partial(&mut self, block: BlockId, parent: Option<&BlockKey>, tokens: &[u64]) {
        let b = block as usize;
        if tokens.is_empty()
            || tokens.len() >= self.block_size
            || self.key[b].is_some()
            || self.content[b].is_some()
            || self.ref_count[b] != 1
        {
            return;
        }
        self.file(block, parent, tokens);
    }

    /// Drops one reference; the last one returns the block to the cache (if it has content) or the free list.
    pub fn release(&mut self, block: BlockId) {
        let rc = &mut self.ref_count[block as usize];
        assert!(*rc > 0, "block {block} released more often than taken");
        *rc -= 1;
        if *rc > 0 {
            return;
        }
        if self.key[block as usize].is_some() || self.content[block as usize].is_some() {
            self.tick += 1;
            self.released_at[block as usize] = self.tick;
            self.evictable.insert(self.tick, block);
        } else {
            self.free.push_back(block);
        }
    }

    /// Releases every block of a table (in reverse, so a prefix's tail is evicted before its head).
    pub fn release_all(&mut self, table: &mut Vec<BlockId>) {
        for b in table.drain(..).rev() {
            self.release(b);
        }
    }

    /// Number of sequences holding `block` (tests, assertions).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_count[block as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_reuse_cached_content() {
        let mut m = BlockManager::new(3, 4);
        let k1 = BlockKey::new(None, &[1, 2, 3, 4]);
        let a = m.allocate().unwrap();
        m.register(a, k1, None, &[1, 2, 3, 4]);
        let b = m.allocate().unwrap();
        assert_eq!(m.stats().used, 2);
        m.release(a);
        m.release(b);
        assert_eq!(m.stats().used, 0);
        assert_eq!(m.stats().cached, 1);
        // The cached block comes back on lookup, with its content.
        assert_eq!(m.lookup(&k1), Some(a));
        assert_eq!(m.ref_count(a), 1);
        assert_eq!(m.lookup(&BlockKey::new(None, &[9, 9, 9, 9])), None);
        m.release(a);
        // Allocation prefers free blocks, then evicts the cached one.
        let got: Vec<_> = (0..3).map(|_| m.allocate().unwrap()).collect();
        assert!(got.contains(&a));
        assert_eq!(m.allocate(), None);
        assert_eq!(m.lookup(&k1), None, "evicted content is gone");
        for g in got {
            m.release(g);
        }
        assert_eq!(m.stats().used, 0);
    }

    #[test]
    fn partly_shared_blocks_are_found_by_their_parent_and_longest_run() {
        let mut m = BlockManager::new(4, 4);
        let root = BlockKey::new(None, &[1, 2, 3, 4]);
        let a = m.allocate().unwrap();
        m.register(a, root, None, &[1, 2, 3, 4]);
        let (b, c) = (m.allocate().unwrap(), m.allocate().unwrap());
        m.register(
            b,
            BlockKey::new(Some(&root), &[5, 6, 7, 8]),
            Some(&root),
            &[5, 6, 7, 8],
        );
        m.register(
            c,
            BlockKey::new(Some(&root), &[5, 6, 9, 9]),
            Some(&root),
            &[5, 6, 9, 9],
        );
        for x in [a, b, c] {
            m.release(x);
        }
        // The longest run after the same parent; a first block is found under no parent.
        assert_eq!(m.partial(Some(&root), &[5, 6, 7, 0]), Some((b, 3)));
        assert_eq!(m.ref_count(b), 1, "referenced for the copy");
        assert_eq!(m.stats().cached, 2);
        assert_eq!(m.partial(Some(&root), &[5, 6, 9]), Some((c, 3)));
        assert_eq!(m.partial(None, &[1, 2, 0]), Some((a, 2)));
        assert_eq!(
            m.partial(Some(&root), &[6]),
            None,
            "no first token in common"
        );
        let other = BlockKey::new(None, &[0, 0, 0, 0]);
        assert_eq!(m.partial(Some(&other), &[5, 6]), None, "another parent");
        let st = m.stats();
        assert_eq!((st.partial_hits, st.partial_positions), (3, 8));
        for x in [b, c, a] {
            m.release(x);
        }
        // Evicted blocks are no longer found (the free block goes first, then the least recently released
        // cached one: b).
        let got: Vec<_> = (0..2).map(|_| m.allocate().unwrap()).collect();
        assert!(got.contains(&b));
        assert_eq!(
            m.partial(Some(&root), &[5, 6, 7]),
            Some((c, 2)),
            "b evicted"
        );
        assert_eq!(m.partial(None, &[1, 2]), Some((a, 2)));
    }

    #[test]
    fn keys_chain_over_the_prefix() {
        let a = BlockKey::new(None, &[1, 2]);
        let b = BlockKey::new(Some(&a), &[3, 4]);
        let c = BlockKey::new(Some(&BlockKey::new(None, &[1, 5])), &[3, 4]);
        assert_ne!(
            b, c,
            "same tokens after a different prefix are different content"
        );
        assert_eq!(b, BlockKey::new(Some(&a), &[3, 4]));
    }
}
