//! Resident page tables: which logical page occupies which resident slot, per (sequence, layer,
//! KV head), and how a selection turns into kept / to-recall / victim pages.
//!
//! # Placement rules
//!
//! With `ns` sink, `k` middle and `nw` window pages (`nb = ns + k + nw` slots, see [`Budget`]),
//! logical page `p` opens (its first token is appended) in its *home slot*:
//!
//! * `p < nb` (dense phase, everything fits): slot `p`;
//! * `p ≥ nb` (sparse phase): the ring slot `ns + k + ((p − ns − k) mod nw)`, which held page
//!   `p − nw`: that page just left the window and stops being resident (its data lives in the host
//!   pool; selection may recall it later).
//!
//! For `p ≥ ns + k` both rules give the same slot, so the transition from dense to sparse moves no
//! data, and the ring never copies pages: the current page is written where it will stay until it
//! leaves the window. Sinks stay in slots `0..ns` forever; middle slots `ns..ns+k` start with
//! pages `ns..ns+k` (dense phase) and are afterwards replaced only by [`SlotTable::apply`].
//!
//! # Invariants (checked by [`SlotTable::check_consistency`])
//!
//! * slot → page and page → slot are inverse partial maps: a slot holds at most one page and every
//!   resident page is in exactly one slot;
//! * sink pages (`0..min(ns, N)`) are resident in slot `p`;
//! * window pages (the last `nw` pages, not sinks) are resident, in their ring slot (or, in the
//!   dense phase, in their identity slot);
//! * ring slots hold only window pages, sink slots only sinks;
//! * in the sparse phase, middle slots hold only middle pages (never sink or window pages), so at
//!   most `k` of them.
//!
//! # Diffs
//!
//! A [`SlotDiff`] is a selection's effect on the middle slots, with slots attached. Two ways to
//! get one:
//!
//! * [`SlotTable::diff`] (canonical): `kept` = selected pages already resident; `victims` = every
//!   resident middle page that is not selected (so the attended set is exactly sinks + selection +
//!   window); `recalls` = the missing selected pages in ascending page order, assigned to the free
//!   middle slots (empty or vacated by a victim) in ascending slot order.
//! * [`SlotTable::place`]: slots for a page-level diff computed elsewhere (e.g.
//!   `freekv_select::diff_selection`, whose victims are the lowest-scoring unselected residents,
//!   only as many as needed): `to_recall[i]` goes into the slot of `victims[i]`, the remaining
//!   recalls into empty middle slots in ascending slot order.
//!
//! GPU kernels that mirror this table must use the same rules to produce identical slots.

use crate::{Budget, LayoutError};
use std::ops::Range;

/// Marker for "no page" / "no slot" in the compact tables ([`SlotTable::slot_to_page`],
/// [`SlotTable::page_to_slot`]).
pub const NO_ENTRY: u32 = u32::MAX;
const EMPTY: u32 = NO_ENTRY;

/// Largest number of logical pages one table may track (ids must stay below [`EMPTY`]).
const MAX_PAGES: usize = (u32::MAX - 1) as usize;

/// A (logical page, resident slot) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotPage {
    /// Logical page index within the sequence (token `t` is in page `t / P`).
    pub page: usize,
    /// Resident slot index within the layer's budget (`0 .. nb`).
    pub slot: usize,
}

/// The effect of one selection on the middle slots of one (sequence, layer, KV head).
///
/// Produced by [`SlotTable::diff`] and applied by [`SlotTable::apply`]; the recall engine moves
/// the data of `recalls` (host page → slot). Between `apply` and the end of that recall, the
/// table already describes the future state and the slots in `recalls` hold stale data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotDiff {
    /// Selected pages that are already resident, with their slots (no data movement).
    pub kept: Vec<SlotPage>,
    /// Selected pages to fetch from the host, with their destination slots.
    pub recalls: Vec<SlotPage>,
    /// Resident middle pages that were not selected, with the slots they vacate.
    pub victims: Vec<SlotPage>,
}

impl SlotDiff {
    /// True when the selection changes nothing (no recall, no eviction).
    pub fn is_noop(&self) -> bool {
        self.recalls.is_empty() && self.victims.is_empty()
    }
}

/// The resident page table of one (sequence, layer, KV head): slot ↔ logical page, plus the
/// sequence length that determines the sink, window and current pages.
///
/// ```
/// use freekv_layout::{Budget, SlotTable};
/// // 1 sink, 2 retrieved, 2 window pages of 4 tokens: 5 slots.
/// let mut t = SlotTable::new(Budget::new(1, 2, 2, 4).unwrap());
/// t.append_tokens(7 * 4 + 1).unwrap();            // 8 pages, the last one partial
/// assert!(t.is_sparse());
/// assert_eq!(t.candidate_pages(), 1..6);
/// let diff = t.select(&[2, 5]).unwrap();          // keep 2, recall 5, evict 1
/// assert_eq!(diff.recalls.len(), 1);
/// assert_eq!(t.slot_of(5), Some(diff.recalls[0].slot));
/// t.check_consistency().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTable {
    budget: Budget,
    len: usize,
    /// slot → logical page or EMPTY (`nb` entries).
    slot_page: Vec<u32>,
    /// logical page → slot or EMPTY (`N` entries).
    page_slot: Vec<u32>,
}

impl SlotTable {
    /// An empty table (no tokens) for one budget.
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            len: 0,
            slot_page: vec![EMPTY; budget.total_pages()],
            page_slot: Vec::new(),
        }
    }

    /// The budget this table was built for.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Tokens in the sequence (this layer).
    pub fn len_tokens(&self) -> usize {
        self.len
    }

    /// Logical pages `N`, the partially filled last one included.
    pub fn num_pages(&self) -> usize {
        self.page_slot.len()
    }

    /// True once the layer holds more pages than slots: selection and recall are active.
    pub fn is_sparse(&self) -> bool {
        self.budget.is_sparse(self.num_pages())
    }

    /// Sink pages: `0 .. min(ns, N)`.
    pub fn sink_pages(&self) -> Range<usize> {
        0..self.budget.sink_pages().min(self.num_pages())
    }

    /// Window pages: the last `nw` pages that are not sinks (the current page included).
    pub fn window_pages(&self) -> Range<usize> {
        let n = self.num_pages();
        let start = n
            .saturating_sub(self.budget.window_pages())
            .max(self.budget.sink_pages())
            .min(n);
        start..n
    }

    /// Candidate pages of the top-k: `ns .. N − nw` (empty when there are none).
    pub fn candidate_pages(&self) -> Range<usize> {
        let ns = self.budget.sink_pages();
        let end = self.num_pages().saturating_sub(self.budget.window_pages());
        ns..end.max(ns)
    }

    /// The page being filled (the last logical page), if any token exists.
    pub fn current_page(&self) -> Option<usize> {
        self.num_pages().checked_sub(1)
    }

    /// The slot of the page being filled, if any token exists.
    pub fn current_slot(&self) -> Option<usize> {
        self.current_page().and_then(|p| self.slot_of(p))
    }

    /// Where token `pos` lives if its page is resident: `(slot, row within the page)`.
    pub fn slot_for_token(&self, pos: usize) -> Option<(usize, usize)> {
        if pos >= self.len {
            return None;
        }
        let p = self.budget.page_size();
        self.slot_of(pos / p).map(|s| (s, pos % p))
    }

    /// Valid tokens of logical page `page` (`P` for full pages, fewer for the last one, 0 past the
    /// end).
    pub fn page_len(&self, page: usize) -> usize {
        let p = self.budget.page_size();
        self.len.saturating_sub(page.saturating_mul(p)).min(p)
    }

    /// The slot holding logical page `page`, or `None` when it is not resident (or does not exist).
    pub fn slot_of(&self, page: usize) -> Option<usize> {
        match self.page_slot.get(page) {
            Some(&s) if s != EMPTY => Some(s as usize),
            _ => None,
        }
    }

    /// The logical page held by `slot`, or `None` when the slot is empty (or does not exist).
    pub fn page_in(&self, slot: usize) -> Option<usize> {
        match self.slot_page.get(slot) {
            Some(&p) if p != EMPTY => Some(p as usize),
            _ => None,
        }
    }

    /// Every resident page, in slot order.
    pub fn resident(&self) -> impl Iterator<Item = SlotPage> + '_ {
        self.slot_page
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p != EMPTY)
            .map(|(slot, &p)| SlotPage {
                page: p as usize,
                slot,
            })
    }

    /// Resident pages that are neither sink nor window pages ("middle" pages), in slot order.
    pub fn middle(&self) -> impl Iterator<Item = SlotPage> + '_ {
        let window_start = self.window_pages().start;
        let ns = self.budget.sink_pages();
        self.resident()
            .filter(move |sp| sp.page >= ns && sp.page < window_start)
    }

    /// The logical pages of [`middle`](Self::middle), in slot order (the `resident` argument of a
    /// page-level diff such as `freekv_select::diff_selection`).
    pub fn middle_pages(&self) -> Vec<usize> {
        self.middle().map(|sp| sp.page).collect()
    }

    /// The compact slot → logical page table (`nb` entries, [`NO_ENTRY`] when empty), e.g. to
    /// upload to a device.
    pub fn slot_to_page(&self) -> &[u32] {
        &self.slot_page
    }

    /// The compact logical page → slot table (`N` entries, [`NO_ENTRY`] when not resident).
    pub fn page_to_slot(&self) -> &[u32] {
        &self.page_slot
    }

    /// True when `page` is a sink page of the current sequence.
    pub fn is_sink(&self, page: usize) -> bool {
        self.sink_pages().contains(&page)
    }

    /// True when `page` is in the recent window (current page included).
    pub fn is_window(&self, page: usize) -> bool {
        self.window_pages().contains(&page)
    }

    /// The slot a page opens in (see the module docs).
    fn home_slot(&self, page: usize) -> usize {
        let nb = self.budget.total_pages();
        if page < nb {
            page
        } else {
            let base = self.budget.sink_pages() + self.budget.retrieved_pages();
            base + (page - base) % self.budget.window_pages()
        }
    }

    /// Pages after appending `n` tokens, or an error when the count would overflow the table.
    fn pages_after(&self, n: usize) -> Result<(usize, usize), LayoutError> {
        let new_len = self.len.checked_add(n).ok_or(LayoutError::OutOfRange {
            what: "sequence length",
            index: usize::MAX,
            limit: MAX_PAGES,
        })?;
        let pages = new_len.div_ceil(self.budget.page_size());
        if pages > MAX_PAGES {
            return Err(LayoutError::OutOfRange {
                what: "logical page",
                index: pages,
                limit: MAX_PAGES,
            });
        }
        Ok((new_len, pages))
    }

    /// Reserve table memory for `n` more tokens without changing anything.
    fn reserve_for(&mut self, n: usize) -> Result<(usize, usize), LayoutError> {
        let (new_len, pages) = self.pages_after(n)?;
        let extra = pages - self.page_slot.len();
        self.page_slot
            .try_reserve(extra)
            .map_err(|_| LayoutError::PoolExhausted {
                max_pages: pages,
                page_bytes: std::mem::size_of::<u32>(),
            })?;
        Ok((new_len, pages))
    }

    /// Infallible part of an append whose memory has been reserved.
    fn commit_append(&mut self, new_len: usize, pages: usize) -> usize {
        let nb = self.budget.total_pages();
        let nw = self.budget.window_pages();
        let opened = pages - self.page_slot.len();
        for page in self.page_slot.len()..pages {
            let slot = self.home_slot(page);
            // In the sparse phase the home slot holds page − nw, which leaves the window now;
            // in the dense phase it is empty. Evict whatever is there so the maps stay inverse.
            let old = self.slot_page[slot];
            debug_assert!(
                (page >= nb && old as usize == page - nw) || (page < nb && old == EMPTY),
                "slot {slot} held {old} when page {page} opened"
            );
            if let Some(ps) = self.page_slot.get_mut(old as usize) {
                *ps = EMPTY;
            }
            self.slot_page[slot] = page as u32;
            self.page_slot.push(slot as u32);
        }
        self.len = new_len;
        opened
    }

    /// Append `n` tokens: opens every new page in its home slot (evicting pages that leave the
    /// window in the sparse phase). Returns the number of pages opened. On error nothing changes.
    pub fn append_tokens(&mut self, n: usize) -> Result<usize, LayoutError> {
        let (new_len, pages) = self.reserve_for(n)?;
        Ok(self.commit_append(new_len, pages))
    }

    /// The canonical diff of a selection (see the module docs); the table is not changed.
    ///
    /// `selected` must hold distinct candidate pages (`ns ..  N − nw`), at most `k`, in any order;
    /// the layer must be sparse.
    pub fn diff(&self, selected: &[usize]) -> Result<SlotDiff, LayoutError> {
        let _span = tracing::trace_span!("slot_diff", n = selected.len()).entered();
        self.require_sparse()?;
        let k = self.budget.retrieved_pages();
        if selected.len() > k {
            return Err(LayoutError::InvalidSelection(format!(
                "{} pages selected but the budget has {k} retrieved slots",
                selected.len()
            )));
        }
        let mut sel = selected.to_vec();
        sel.sort_unstable();
        if let Some(w) = sel.windows(2).find(|w| w[0] == w[1]) {
            return Err(LayoutError::InvalidSelection(format!(
                "page {} selected twice",
                w[0]
            )));
        }
        let cands = self.candidate_pages();
        if let Some(&bad) = sel.iter().find(|p| !cands.contains(p)) {
            return Err(LayoutError::InvalidSelection(format!(
                "page {bad} is not a candidate (candidates are pages {}..{}: sinks and the window are always resident)",
                cands.start, cands.end
            )));
        }
        let mut diff = SlotDiff::default();
        let mut free = Vec::new();
        for slot in self.budget.middle_slots() {
            match self.page_in(slot) {
                None => free.push(slot),
                Some(page) if sel.binary_search(&page).is_err() => {
                    diff.victims.push(SlotPage { page, slot });
                    free.push(slot);
                }
                Some(_) => {}
            }
        }
        let mut free = free.into_iter();
        for &page in &sel {
            match self.slot_of(page) {
                Some(slot) => diff.kept.push(SlotPage { page, slot }),
                None => {
                    // |free| = k − |kept| ≥ |selected| − |kept| = |missing|.
                    let slot = free.next().ok_or_else(|| {
                        LayoutError::Inconsistent(
                            "fewer free middle slots than missing pages".into(),
                        )
                    })?;
                    diff.recalls.push(SlotPage { page, slot });
                }
            }
        }
        Ok(diff)
    }

    fn require_sparse(&self) -> Result<(), LayoutError> {
        if self.is_sparse() {
            Ok(())
        } else {
            Err(LayoutError::NotSparse {
                pages: self.num_pages(),
                budget_pages: self.budget.total_pages(),
            })
        }
    }

    /// Apply a diff atomically: it is validated against the current table first (kept and victim
    /// pages resident in the named middle slots, each slot named once; recalled pages distinct,
    /// non-resident candidates; destination slots empty or vacated by a victim, each used once)
    /// and on any error nothing changes. Resident middle pages the diff does not name stay
    /// resident (the canonical [`diff`](Self::diff) names all of them).
    pub fn apply(&mut self, diff: &SlotDiff) -> Result<(), LayoutError> {
        let _span = tracing::trace_span!("slot_apply", recalls = diff.recalls.len()).entered();
        self.require_sparse()?;
        let k = self.budget.retrieved_pages();
        let middle = self.budget.middle_slots();
        let cands = self.candidate_pages();
        let bad = |msg: String| Err(LayoutError::InvalidDiff(msg));
        if diff.kept.len() + diff.recalls.len() > k {
            return bad(format!(
                "{} kept + {} recalled pages exceed the {k} retrieved slots",
                diff.kept.len(),
                diff.recalls.len()
            ));
        }
        // Per middle slot: 0 untouched, 1 kept, 2 victim, 3 victim refilled, 4 empty refilled.
        let mut mark = vec![0u8; k];
        for (what, list, tag) in [("kept", &diff.kept, 1u8), ("victim", &diff.victims, 2u8)] {
            for sp in list.iter() {
                if !middle.contains(&sp.slot) {
                    return bad(format!("{what} slot {} is not a middle slot", sp.slot));
                }
                if self.page_in(sp.slot) != Some(sp.page) {
                    return bad(format!(
                        "{what} page {} is not in slot {} (slot holds {:?})",
                        sp.page,
                        sp.slot,
                        self.page_in(sp.slot)
                    ));
                }
                if !cands.contains(&sp.page) {
                    return bad(format!("{what} page {} is not a middle page", sp.page));
                }
                let m = &mut mark[sp.slot - middle.start];
                if *m != 0 {
                    return bad(format!("slot {} listed twice", sp.slot));
                }
                *m = tag;
            }
        }
        let mut recall_pages: Vec<usize> = diff.recalls.iter().map(|sp| sp.page).collect();
        recall_pages.sort_unstable();
        if let Some(w) = recall_pages.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("page {} recalled twice", w[0]));
        }
        for sp in &diff.recalls {
            if !cands.contains(&sp.page) {
                return bad(format!(
                    "recalled page {} is not a candidate ({}..{})",
                    sp.page, cands.start, cands.end
                ));
            }
            if self.slot_of(sp.page).is_some() {
                return bad(format!("recalled page {} is already resident", sp.page));
            }
            if !middle.contains(&sp.slot) {
                return bad(format!("recall slot {} is not a middle slot", sp.slot));
            }
            let m = &mut mark[sp.slot - middle.start];
            *m = match *m {
                0 if self.page_in(sp.slot).is_none() => 4,
                2 => 3,
                _ => {
                    return bad(format!(
                        "recall slot {} is neither empty nor vacated by a victim, or used twice",
                        sp.slot
                    ));
                }
            };
        }
        // Validated: mutate.
        for sp in &diff.victims {
            self.slot_page[sp.slot] = EMPTY;
            self.page_slot[sp.page] = EMPTY;
        }
        for sp in &diff.recalls {
            self.slot_page[sp.slot] = sp.page as u32;
            self.page_slot[sp.page] = sp.slot as u32;
        }
        Ok(())
    }

    /// Slots for a page-level diff computed elsewhere (see the module docs): `victims` are resident
    /// middle pages to evict, `to_recall` non-resident candidates to fetch; `to_recall[i]` goes
    /// into the slot of `victims[i]`, the rest into empty middle slots in ascending order; `kept`
    /// (selected pages already resident) is only checked and recorded. The table is not changed;
    /// pass the result to [`apply`](Self::apply).
    pub fn place(
        &self,
        kept: &[usize],
        to_recall: &[usize],
        victims: &[usize],
    ) -> Result<SlotDiff, LayoutError> {
        self.require_sparse()?;
        let resident_middle = |page: usize, what: &str| -> Result<SlotPage, LayoutError> {
            match self.slot_of(page) {
                Some(slot) if self.budget.middle_slots().contains(&slot) => {
                    Ok(SlotPage { page, slot })
                }
                _ => Err(LayoutError::InvalidDiff(format!(
                    "{what} page {page} is not a resident middle page"
                ))),
            }
        };
        let mut diff = SlotDiff::default();
        for &p in kept {
            diff.kept.push(resident_middle(p, "kept")?);
        }
        for &p in victims {
            diff.victims.push(resident_middle(p, "victim")?);
        }
        let mut empty = self
            .budget
            .middle_slots()
            .filter(|&s| self.page_in(s).is_none());
        for (i, &page) in to_recall.iter().enumerate() {
            let slot = match diff.victims.get(i) {
                Some(v) => v.slot,
                None => empty.next().ok_or_else(|| {
                    LayoutError::InvalidDiff(format!(
                        "{} pages to recall but only {} victims and not enough empty middle slots",
                        to_recall.len(),
                        victims.len()
                    ))
                })?,
            };
            diff.recalls.push(SlotPage { page, slot });
        }
        Ok(diff)
    }

    /// [`diff`](Self::diff) then [`apply`](Self::apply): the middle slots end up holding exactly
    /// `selected`. Returns the diff (its `recalls` are what the recall engine must move).
    pub fn select(&mut self, selected: &[usize]) -> Result<SlotDiff, LayoutError> {
        let diff = self.diff(selected)?;
        self.apply(&diff)?;
        Ok(diff)
    }

    /// Evict every middle page (resident, neither sink nor window), e.g. after a prefill whose
    /// middle slots were never filled; the next selection then recalls all of its pages. Returns
    /// what was evicted, in slot order.
    pub fn evict_middle(&mut self) -> Vec<SlotPage> {
        let evicted: Vec<SlotPage> = self.middle().collect();
        for sp in &evicted {
            self.slot_page[sp.slot] = EMPTY;
            self.page_slot[sp.page] = EMPTY;
        }
        evicted
    }

    /// Forget the sequence (length 0, every slot empty); the budget is kept.
    pub fn reset(&mut self) {
        self.len = 0;
        self.page_slot.clear();
        self.slot_page.iter_mut().for_each(|s| *s = EMPTY);
    }

    /// Check every invariant listed in the module docs; `Err(Inconsistent)` names the first one
    /// that fails. Cost O(N + nb); meant for tests and debug checks.
    pub fn check_consistency(&self) -> Result<(), LayoutError> {
        let fail = |msg: String| Err(LayoutError::Inconsistent(msg));
        let b = self.budget;
        let nb = b.total_pages();
        let n = self.num_pages();
        if self.slot_page.len() != nb {
            return fail(format!(
                "{} slots for a budget of {nb}",
                self.slot_page.len()
            ));
        }
        if n != self.len.div_ceil(b.page_size()) {
            return fail(format!("{n} pages for {} tokens", self.len));
        }
        let mut resident = 0usize;
        for (slot, &p) in self.slot_page.iter().enumerate() {
            if p == EMPTY {
                continue;
            }
            resident += 1;
            let p = p as usize;
            if p >= n {
                return fail(format!("slot {slot} holds page {p} of {n}"));
            }
            if self.page_slot[p] as usize != slot {
                return fail(format!(
                    "slot {slot} holds page {p} but page {p} maps to slot {}",
                    self.page_slot[p]
                ));
            }
            let region_ok = if b.sink_slots().contains(&slot) {
                p == slot
            } else if b.ring_slots().contains(&slot) {
                self.is_window(p)
            } else {
                // middle slot: never a sink; a window page only in the dense phase.
                !self.is_sink(p) && (!self.is_window(p) || (!self.is_sparse() && p == slot))
            };
            if !region_ok {
                return fail(format!(
                    "slot {slot} holds page {p}, which does not belong in that region (N = {n})"
                ));
            }
        }
        let mapped = self.page_slot.iter().filter(|&&s| s != EMPTY).count();
        if mapped != resident {
            return fail(format!(
                "{mapped} pages map to a slot but {resident} slots are occupied"
            ));
        }
        for p in self.sink_pages() {
            if self.slot_of(p) != Some(p) {
                return fail(format!("sink page {p} is not resident in slot {p}"));
            }
        }
        for p in self.window_pages() {
            // Identity below nb (dense phase, and the ring's first lap), the ring slot above.
            let want = self.home_slot(p);
            if self.slot_of(p) != Some(want) {
                return fail(format!(
                    "window page {p} is in slot {:?}, expected {want}",
                    self.slot_of(p)
                ));
            }
        }
        let middle = self.middle().count();
        if middle > b.retrieved_pages() {
            return fail(format!(
                "{middle} middle pages resident, more than k = {}",
                b.retrieved_pages()
            ));
        }
        Ok(())
    }
}

/// The resident tables of one (sequence, layer): one [`SlotTable`] per KV head, appended in
/// lockstep (sinks, window and the current slot are the same for every head; the middle differs
/// because each KV head selects independently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerResidency {
    heads: Vec<SlotTable>,
}

impl LayerResidency {
    /// Tables for `kv_heads` heads (≥ 1), all empty.
    pub fn new(budget: Budget, kv_heads: usize) -> Result<Self, LayoutError> {
        if kv_heads == 0 {
            return Err(LayoutError::InvalidGeometry(
                "a layer needs at least one KV head".into(),
            ));
        }
        Ok(Self {
            heads: vec![SlotTable::new(budget); kv_heads],
        })
    }

    /// The shared budget.
    pub fn budget(&self) -> Budget {
        self.first().budget()
    }

    fn first(&self) -> &SlotTable {
        // `new` guarantees at least one head.
        &self.heads[0]
    }

    /// KV heads.
    pub fn kv_heads(&self) -> usize {
        self.heads.len()
    }

    /// Tokens in the sequence (this layer).
    pub fn len_tokens(&self) -> usize {
        self.first().len_tokens()
    }

    /// Logical pages, the partial one included.
    pub fn num_pages(&self) -> usize {
        self.first().num_pages()
    }

    /// True once the layer runs sparse.
    pub fn is_sparse(&self) -> bool {
        self.first().is_sparse()
    }

    /// The slot of the page being filled (the same for every head).
    pub fn current_slot(&self) -> Option<usize> {
        self.first().current_slot()
    }

    /// All per-head tables.
    pub fn heads(&self) -> &[SlotTable] {
        &self.heads
    }

    /// The table of KV head `head`.
    pub fn head(&self, head: usize) -> Result<&SlotTable, LayoutError> {
        let limit = self.heads.len();
        self.heads.get(head).ok_or(LayoutError::OutOfRange {
            what: "kv head",
            index: head,
            limit,
        })
    }

    /// The table of KV head `head`, mutable (to apply that head's selection).
    pub fn head_mut(&mut self, head: usize) -> Result<&mut SlotTable, LayoutError> {
        let limit = self.heads.len();
        self.heads.get_mut(head).ok_or(LayoutError::OutOfRange {
            what: "kv head",
            index: head,
            limit,
        })
    }

    /// Append `n` tokens to every head; on error nothing changes. Returns the pages opened.
    pub fn append_tokens(&mut self, n: usize) -> Result<usize, LayoutError> {
        let mut plan = (0, 0);
        for t in &mut self.heads {
            plan = t.reserve_for(n)?;
        }
        let mut opened = 0;
        for t in &mut self.heads {
            opened = t.commit_append(plan.0, plan.1);
        }
        Ok(opened)
    }

    /// Forget the sequence in every head.
    pub fn reset(&mut self) {
        self.heads.iter_mut().for_each(SlotTable::reset);
    }

    /// Every head's invariants, and that all heads agree on length and on sink/window slots.
    pub fn check_consistency(&self) -> Result<(), LayoutError> {
        let first = self.first();
        for (h, t) in self.heads.iter().enumerate() {
            t.check_consistency()
                .map_err(|e| LayoutError::Inconsistent(format!("kv head {h}: {e}")))?;
            if t.len_tokens() != first.len_tokens() || t.budget() != first.budget() {
                return Err(LayoutError::Inconsistent(format!(
                    "kv head {h} has {} tokens, head 0 has {}",
                    t.len_tokens(),
                    first.len_tokens()
                )));
            }
            for p in first.sink_pages().chain(first.window_pages()) {
                if t.slot_of(p) != first.slot_of(p) {
                    return Err(LayoutError::Inconsistent(format!(
                        "kv head {h} holds page {p} in slot {:?}, head 0 in {:?}",
                        t.slot_of(p),
                        first.slot_of(p)
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(page: usize, slot: usize) -> SlotPage {
        SlotPage { page, slot }
    }

    /// ns = 1, k = 2, nw = 2, P = 4: slots 0 | 1 2 | 3 4.
    fn table() -> SlotTable {
        SlotTable::new(Budget::new(1, 2, 2, 4).unwrap())
    }

    #[test]
    fn dense_phase_is_identity_and_transition_moves_no_data() {
        let mut t = table();
        assert_eq!(t.current_slot(), None);
        assert_eq!(t.append_tokens(0).unwrap(), 0);
        assert_eq!(t.append_tokens(1).unwrap(), 1);
        assert_eq!(t.current_slot(), Some(0));
        assert_eq!(t.sink_pages(), 0..1);
        assert_eq!(t.window_pages(), 1..1);
        t.append_tokens(19).unwrap(); // 20 tokens = 5 full pages = nb
        assert!(!t.is_sparse());
        for p in 0..5 {
            assert_eq!(t.slot_of(p), Some(p));
        }
        assert_eq!(t.window_pages(), 3..5);
        assert_eq!(t.candidate_pages(), 1..3);
        assert!(matches!(
            t.diff(&[1]),
            Err(LayoutError::NotSparse {
                pages: 5,
                budget_pages: 5
            })
        ));
        t.check_consistency().unwrap();
        // Page 5 opens in ring slot 3 (= 1 + 2 + (5 − 3) mod 2), evicting page 3.
        assert_eq!(t.append_tokens(1).unwrap(), 1);
        assert!(t.is_sparse());
        assert_eq!(t.slot_of(5), Some(3));
        assert_eq!(t.slot_of(3), None);
        assert_eq!(t.slot_for_token(20), Some((3, 0)));
        assert_eq!(t.slot_for_token(21), None);
        assert_eq!(t.slot_for_token(13), None);
        assert_eq!(t.slot_for_token(17), Some((4, 1)));
        assert_eq!(t.candidate_pages(), 1..4);
        assert_eq!(t.page_len(5), 1);
        assert_eq!(t.page_len(4), 4);
        assert_eq!(t.page_len(6), 0);
        t.check_consistency().unwrap();
        let mid: Vec<_> = t.middle().collect();
        assert_eq!(mid, vec![sp(1, 1), sp(2, 2)]);
        assert_eq!(t.middle_pages(), vec![1, 2]);
        assert_eq!(t.slot_to_page(), &[0, 1, 2, 5, 4]);
        assert_eq!(t.page_to_slot(), &[0, 1, 2, NO_ENTRY, 4, 3]);
    }

    #[test]
    fn canonical_diff() {
        let mut t = table();
        t.append_tokens(8 * 4).unwrap(); // 8 full pages; window 6, 7; candidates 1..6
        assert_eq!(t.candidate_pages(), 1..6);
        let d = t.diff(&[5, 2]).unwrap();
        assert_eq!(d.kept, vec![sp(2, 2)]);
        assert_eq!(d.victims, vec![sp(1, 1)]);
        assert_eq!(d.recalls, vec![sp(5, 1)]);
        t.apply(&d).unwrap();
        t.check_consistency().unwrap();
        // Reselecting the same set is a no-op.
        assert!(t.diff(&[2, 5]).unwrap().is_noop());
        // Fewer than k selected: the unselected resident is still evicted, its slot left empty.
        let d = t.select(&[4]).unwrap();
        assert_eq!(d.victims, vec![sp(5, 1), sp(2, 2)]);
        assert_eq!(d.recalls, vec![sp(4, 1)]);
        assert_eq!(t.page_in(2), None);
        t.check_consistency().unwrap();
        // Empty middle slots are filled first by ascending slot.
        let d = t.select(&[3, 4]).unwrap();
        assert_eq!(d.kept, vec![sp(4, 1)]);
        assert_eq!(d.recalls, vec![sp(3, 2)]);
        assert!(d.victims.is_empty());
    }

    #[test]
    fn bad_selections_are_errors() {
        let mut t = table();
        t.append_tokens(8 * 4).unwrap();
        let before = t.clone();
        for (sel, msg) in [
            (&[1usize, 2, 3][..], "3 pages selected"),
            (&[2, 2][..], "selected twice"),
            (&[0][..], "not a candidate"),
            (&[6][..], "not a candidate"),
            (&[9][..], "not a candidate"),
        ] {
            let e = t.select(sel).unwrap_err();
            assert!(e.to_string().contains(msg), "{sel:?}: {e}");
        }
        assert_eq!(t, before);
    }

    #[test]
    fn stale_and_malformed_diffs_are_rejected_atomically() {
        let mut t = table();
        t.append_tokens(8 * 4).unwrap();
        let good = t.diff(&[3, 4]).unwrap();
        let before = t.clone();
        let mut cases = Vec::new();
        let mut d = good.clone();
        d.victims.pop();
        cases.push((d, "neither empty nor vacated"));
        let mut d = good.clone();
        d.recalls[0].slot = 3;
        cases.push((d, "not a middle slot"));
        let mut d = good.clone();
        d.recalls[1].slot = d.recalls[0].slot;
        cases.push((d, "used twice"));
        let mut d = good.clone();
        d.recalls[1].page = d.recalls[0].page;
        cases.push((d, "recalled twice"));
        let mut d = good.clone();
        d.recalls[0].page = 1;
        cases.push((d, "already resident"));
        let mut d = good.clone();
        d.recalls[0].page = 7;
        cases.push((d, "not a candidate"));
        let mut d = good.clone();
        d.victims[0].page = 4;
        cases.push((d, "is not in slot"));
        let mut d = good.clone();
        d.kept.push(d.victims[0]);
        cases.push((d, "exceed"));
        let mut d = good.clone();
        d.victims.push(d.victims[0]);
        cases.push((d, "listed twice"));
        for (d, msg) in cases {
            let e = t.apply(&d).unwrap_err();
            assert!(matches!(e, LayoutError::InvalidDiff(_)), "{e}");
            assert!(e.to_string().contains(msg), "expected {msg:?}: {e}");
            assert_eq!(t, before);
        }
        t.apply(&good).unwrap();
        // The same diff again is stale now.
        assert!(t.apply(&good).is_err());
        t.check_consistency().unwrap();
    }

    #[test]
    fn place_follows_page_level_diffs() {
        let mut t = table();
        t.append_tokens(8 * 4).unwrap(); // middle {1, 2}
        let d = t.place(&[2], &[5], &[1]).unwrap();
        assert_eq!(d, t.diff(&[2, 5]).unwrap());
        // to_recall[i] goes to victims[i]'s slot, whatever the page order.
        let d = t.place(&[], &[5, 3], &[2, 1]).unwrap();
        assert_eq!(d.recalls, vec![sp(5, 2), sp(3, 1)]);
        t.apply(&d).unwrap();
        t.check_consistency().unwrap();
        assert!(t.place(&[4], &[], &[]).is_err()); // 4 is not resident
        assert!(t.place(&[], &[4], &[]).is_err()); // no room
        assert!(t.place(&[], &[], &[6]).is_err()); // window page, not middle
        // Free slots first, and unselected residents that are not victims stay resident.
        let mut t = SlotTable::new(Budget::new(1, 3, 2, 4).unwrap());
        t.append_tokens(10 * 4).unwrap();
        t.select(&[1]).unwrap(); // middle {1}, slots 2 and 3 empty
        let d = t.place(&[], &[4, 5], &[]).unwrap();
        assert_eq!(d.recalls, vec![sp(4, 2), sp(5, 3)]);
        t.apply(&d).unwrap();
        assert_eq!(t.middle().count(), 3);
        t.check_consistency().unwrap();
        let d = t.place(&[], &[6], &[4]).unwrap();
        t.apply(&d).unwrap();
        assert_eq!(t.slot_of(6), Some(2));
        t.check_consistency().unwrap();
    }

    #[test]
    fn evict_middle_and_reset() {
        let mut t = table();
        t.append_tokens(7 * 4 + 2).unwrap();
        let ev = t.evict_middle();
        assert_eq!(ev, vec![sp(1, 1), sp(2, 2)]);
        t.check_consistency().unwrap();
        let d = t.select(&[2, 5]).unwrap();
        assert_eq!(d.recalls, vec![sp(2, 1), sp(5, 2)]);
        t.reset();
        assert_eq!(t.num_pages(), 0);
        assert_eq!(t.resident().count(), 0);
        t.check_consistency().unwrap();
        // Dense-phase eviction keeps window pages.
        t.append_tokens(3 * 4).unwrap(); // pages 0,1,2; window 1,2
        assert!(t.evict_middle().is_empty());
        t.append_tokens(4).unwrap(); // page 1 leaves the window
        assert_eq!(t.evict_middle(), vec![sp(1, 1)]);
        t.check_consistency().unwrap();
        t.append_tokens(10 * 4).unwrap();
        t.check_consistency().unwrap();
    }

    #[test]
    fn single_page_window_and_no_sinks() {
        let mut t = SlotTable::new(Budget::new(0, 2, 1, 2).unwrap());
        for _ in 0..40 {
            t.append_tokens(1).unwrap();
            t.check_consistency().unwrap();
            assert_eq!(
                t.current_slot(),
                Some(if t.num_pages() <= 3 {
                    t.num_pages() - 1
                } else {
                    2
                })
            );
        }
        let c = t.candidate_pages();
        assert_eq!(c, 0..19);
        t.select(&[0, 18]).unwrap();
        t.check_consistency().unwrap();
    }

    #[test]
    fn overflow_is_an_error_without_change() {
        let mut t = table();
        t.append_tokens(3).unwrap();
        let before = t.clone();
        assert!(t.append_tokens(usize::MAX).is_err());
        assert!(t.append_tokens(usize::MAX / 2).is_err());
        assert_eq!(t, before);
    }

    #[test]
    fn layer_residency_heads_share_sinks_and_window() {
        let b = Budget::new(1, 2, 2, 4).unwrap();
        assert!(LayerResidency::new(b, 0).is_err());
        let mut r = LayerResidency::new(b, 3).unwrap();
        r.append_tokens(9 * 4).unwrap();
        assert_eq!(r.kv_heads(), 3);
        assert_eq!(r.num_pages(), 9);
        assert!(r.is_sparse());
        r.head_mut(0).unwrap().select(&[1, 6]).unwrap();
        r.head_mut(2).unwrap().select(&[3]).unwrap();
        assert!(r.head_mut(3).is_err());
        r.check_consistency().unwrap();
        assert_eq!(r.current_slot(), r.head(1).unwrap().current_slot());
        assert_ne!(r.head(0).unwrap(), r.head(2).unwrap());
        r.append_tokens(4).unwrap();
        r.check_consistency().unwrap();
        r.reset();
        assert_eq!(r.len_tokens(), 0);
    }
}
