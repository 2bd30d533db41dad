//! The middle slots of one (sequence, layer, KV head) as a cache: `k` slots for the retrieved
//! pages plus `spare` slots that keep pages beyond the top-k (the spare slots of the GPU FreeKV
//! path). This is the CPU reference of the slot diff `freekv_select_rows` runs on the device
//! with spare slots (its `mid_page` row, recall list and page mask).
//!
//! A selection names the pages it wants resident (ascending). Slots that are empty or hold a page
//! not wanted are free; with spare slots they are taken lowest-scored page first (empty slots and
//! pages that are no longer candidates count as the lowest key, ties go to the lower slot),
//! without spare slots in slot order. The missing wanted pages, ascending, take the free slots in
//! that order; only the pages they overwrite are evicted: a free slot nobody takes keeps its page
//! cached. Attention reads only the slots that hold the top-k ([`MiddleCache::skip_mask`]).

use crate::LayoutError;

/// The middle slots of one head: which logical page each holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MiddleCache {
    top_k: usize,
    slots: Vec<Option<usize>>,
}

/// What one [`MiddleCache::select`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheDiff {
    /// `(page, middle index)` to recall, the missing wanted pages ascending.
    pub recalls: Vec<(usize, usize)>,
    /// `(page, middle index)` of the cached pages the recalls overwrite.
    pub evicted: Vec<(usize, usize)>,
}

impl MiddleCache {
    /// An empty cache of `top_k` (≥ 1) retrieved slots and `spare` spare slots.
    pub fn new(top_k: usize, spare: usize) -> Result<Self, LayoutError> {
        if top_k == 0 {
            return Err(LayoutError::InvalidBudget(
                "a middle cache needs at least one retrieved slot".into(),
            ));
        }
        let n = top_k.checked_add(spare).ok_or_else(|| {
            LayoutError::InvalidBudget(format!("{top_k} + {spare} middle slots overflow"))
        })?;
        Ok(Self {
            top_k,
            slots: vec![None; n],
        })
    }

    /// Retrieved pages `k` (the attended part).
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Middle slots `k + spare`.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The page each middle slot holds.
    pub fn pages(&self) -> &[Option<usize>] {
        &self.slots
    }

    /// The middle slot holding `page`.
    pub fn slot_of(&self, page: usize) -> Option<usize> {
        self.slots.iter().position(|&p| p == Some(page))
    }

    /// Evict everything (a first sparse step).
    pub fn clear(&mut self) {
        self.slots.fill(None);
    }

    /// Make `wanted` (ascending, distinct, at most [`Self::capacity`] pages) resident. `key`
    /// gives the order-preserving key of a cached page's score under the current query
    /// (`freekv_select::score_key`; 0 for a page that is no longer a candidate); it orders the
    /// free slots only when there are spare slots.
    pub fn select(
        &mut self,
        wanted: &[usize],
        key: impl Fn(usize) -> u32,
    ) -> Result<CacheDiff, LayoutError> {
        if wanted.len() > self.capacity() {
            return Err(LayoutError::InvalidSelection(format!(
                "{} pages wanted in {} middle slots",
                wanted.len(),
                self.capacity()
            )));
        }
        if wanted.windows(2).any(|w| w[0] >= w[1]) {
            return Err(LayoutError::InvalidSelection(
                "wanted pages must be ascending and distinct".into(),
            ));
        }
        let is_wanted = |p: Option<usize>| p.is_some_and(|p| wanted.binary_search(&p).is_ok());
        let mut free: Vec<usize> = (0..self.capacity())
            .filter(|&i| !is_wanted(self.slots[i]))
            .collect();
        if self.capacity() > self.top_k {
            free.sort_by_key(|&i| (self.slots[i].map_or(0, &key), i));
        }
        let mut free = free.into_iter();
        let mut diff = CacheDiff::default();
        for &p in wanted {
            if self.slot_of(p).is_some() {
                continue;
            }
            // At most `capacity` wanted pages: a free slot for every missing one.
            let Some(i) = free.next() else {
                return Err(LayoutError::Inconsistent(
                    "no free middle slot for a missing page".into(),
                ));
            };
            if let Some(old) = self.slots[i] {
                diff.evicted.push((old, i));
            }
            self.slots[i] = Some(p);
            diff.recalls.push((p, i));
        }
        Ok(diff)
    }

    /// Per middle slot: `true` where attention skips it (it holds no page of `attended`, the
    /// head's top-k, ascending).
    pub fn skip_mask(&self, attended: &[usize]) -> Vec<bool> {
        self.slots
            .iter()
            .map(|p| !p.is_some_and(|p| attended.binary_search(&p).is_ok()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_eviction_keeps_cached_pages_and_takes_the_lowest_scored_first() {
        let mut c = MiddleCache::new(2, 2).unwrap();
        assert_eq!(c.capacity(), 4);
        // Empty slots ascending first (all key 0).
        let d = c.select(&[3, 5, 9], |_| 0).unwrap();
        assert_eq!(d.recalls, [(3, 0), (5, 1), (9, 2)]);
        assert!(d.evicted.is_empty());
        // 3 and 5 leave the top-k but stay cached; 7 takes the empty slot.
        let d = c.select(&[7, 9], |p| p as u32).unwrap();
        assert_eq!(d.recalls, [(7, 3)]);
        assert_eq!(c.pages(), [Some(3), Some(5), Some(9), Some(7)]);
        // 3 comes back without a recall; 11 overwrites the lowest-scored free page (the free
        // ones hold 5 and 7: 5 scores lower).
        let d = c.select(&[3, 9, 11], |p| p as u32).unwrap();
        assert_eq!(d.recalls, [(11, 1)]);
        assert_eq!(d.evicted, [(5, 1)]);
        assert_eq!(c.skip_mask(&[3, 11]), [false, false, true, true]);
        // Ties go to the lower slot; a non-candidate (key 0) goes before any candidate.
        let d = c.select(&[1, 2], |p| if p == 9 { 0 } else { 50 }).unwrap();
        assert_eq!(d.recalls, [(1, 2), (2, 0)]);
        assert_eq!(d.evicted, [(9, 2), (3, 0)]);
        c.clear();
        assert!(c.pages().iter().all(Option::is_none));
    }

    #[test]
    fn without_spare_slots_free_slots_go_in_slot_order() {
        let mut c = MiddleCache::new(3, 0).unwrap();
        c.select(&[1, 2, 3], |_| 0).unwrap();
        // Scores would put slot 2 (page 3) first; without spare slots the order is by slot.
        let d = c.select(&[2, 7, 8], |p| 100 - p as u32).unwrap();
        assert_eq!(d.recalls, [(7, 0), (8, 2)]);
        assert_eq!(d.evicted, [(1, 0), (3, 2)]);
    }

    #[test]
    fn bad_selections_are_refused() {
        assert!(MiddleCache::new(0, 4).is_err());
        assert!(MiddleCache::new(1, usize::MAX).is_err());
        let mut c = MiddleCache::new(2, 1).unwrap();
        assert!(c.select(&[1, 2, 3, 4], |_| 0).is_err());
        assert!(c.select(&[2, 1], |_| 0).is_err());
        assert!(c.select(&[2, 2], |_| 0).is_err());
        assert!(
            c.pages().iter().all(Option::is_none),
            "a refused selection changes nothing"
        );
    }
}
