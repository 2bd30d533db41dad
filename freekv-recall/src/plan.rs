//! Recall plans: which host (page, KV head) units go into which resident slots.

use crate::RecallError;
use freekv_layout::{PageGeometry, PageId, SlotDiff, SlotPage};

/// One unit to recall: the `kv_head` slice of host page `host_page` of sequence `seq` goes into
/// the `kv_head` slice of resident slot `slot` of the same sequence. 16 bytes, GPU-friendly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecallEntry {
    /// Sequence index within the target (batch position).
    pub seq: u32,
    /// KV head.
    pub kv_head: u32,
    /// Host page id in that sequence's host pool (HND).
    pub host_page: PageId,
    /// Destination slot in that sequence's resident pool (NHD).
    pub slot: u32,
}

/// Bounds a plan is checked against without touching buffers (see [`RecallPlan::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// Sequences in the target.
    pub sequences: usize,
    /// KV heads per page.
    pub kv_heads: usize,
    /// Resident slots per sequence.
    pub slots: usize,
    /// Host page ids must be below this.
    pub host_pages: usize,
}

/// The recall work of one layer: a list of [`RecallEntry`]s, executed in order by a
/// [`RecallExecutor`](crate::RecallExecutor).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecallPlan {
    layer: usize,
    entries: Vec<RecallEntry>,
}

fn to_u32(what: &str, x: usize) -> Result<u32, RecallError> {
    u32::try_from(x)
        .map_err(|_| RecallError::InvalidPlan(format!("{what} {x} does not fit in u32")))
}

impl RecallPlan {
    /// An empty plan for `layer` (the layer is used for statistics and tracing only).
    pub fn new(layer: usize) -> Self {
        Self {
            layer,
            entries: Vec::new(),
        }
    }

    /// The layer this plan belongs to.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The entries, in execution order.
    pub fn entries(&self) -> &[RecallEntry] {
        &self.entries
    }

    /// Number of (page, head) units.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is nothing to move.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the plan moves for elements of type `T` and page geometry `geom`.
    pub fn bytes<T>(&self, geom: PageGeometry) -> u64 {
        (self.entries.len() * geom.head_unit_elems() * std::mem::size_of::<T>()) as u64
    }

    /// Append one entry (checked later by [`validate`](Self::validate) or at submission).
    pub fn push(&mut self, entry: RecallEntry) {
        self.entries.push(entry);
    }

    /// Append the recalls of one (sequence, KV head): each `(logical page, slot)` is mapped to its
    /// host page through `host_table` (logical page → host page id, e.g.
    /// `PagedKvCache::page_table(layer)`). Returns the number of entries added; on error (a page
    /// past the table, an index that does not fit) nothing is added.
    pub fn push_recalls(
        &mut self,
        seq: usize,
        kv_head: usize,
        recalls: &[SlotPage],
        host_table: &[PageId],
    ) -> Result<usize, RecallError> {
        let seq32 = to_u32("sequence", seq)?;
        let head32 = to_u32("kv head", kv_head)?;
        let mut added = Vec::with_capacity(recalls.len());
        for sp in recalls {
            let host_page = *host_table.get(sp.page).ok_or_else(|| {
                RecallError::InvalidPlan(format!(
                    "logical page {} of sequence {seq} has no host page (table holds {} pages)",
                    sp.page,
                    host_table.len()
                ))
            })?;
            added.push(RecallEntry {
                seq: seq32,
                kv_head: head32,
                host_page,
                slot: to_u32("slot", sp.slot)?,
            });
        }
        let n = added.len();
        self.entries.extend(added);
        Ok(n)
    }

    /// [`push_recalls`](Self::push_recalls) for the `recalls` of a [`SlotDiff`].
    pub fn push_diff(
        &mut self,
        seq: usize,
        kv_head: usize,
        diff: &SlotDiff,
        host_table: &[PageId],
    ) -> Result<usize, RecallError> {
        self.push_recalls(seq, kv_head, &diff.recalls, host_table)
    }

    /// Check every entry against `limits` and that no two entries write the same
    /// (sequence, head, slot) destination.
    pub fn validate(&self, limits: &PlanLimits) -> Result<(), RecallError> {
        for (i, e) in self.entries.iter().enumerate() {
            let checks = [
                ("sequence", e.seq as usize, limits.sequences),
                ("kv head", e.kv_head as usize, limits.kv_heads),
                ("slot", e.slot as usize, limits.slots),
                ("host page", e.host_page as usize, limits.host_pages),
            ];
            for (what, v, limit) in checks {
                if v >= limit {
                    return Err(RecallError::InvalidPlan(format!(
                        "entry {i}: {what} {v} out of range (limit {limit})"
                    )));
                }
            }
        }
        self.check_unique_destinations()
    }

    pub(crate) fn check_unique_destinations(&self) -> Result<(), RecallError> {
        let mut dest: Vec<(u32, u32, u32)> = self
            .entries
            .iter()
            .map(|e| (e.seq, e.kv_head, e.slot))
            .collect();
        dest.sort_unstable();
        match dest.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(RecallError::InvalidPlan(format!(
                "two entries write sequence {} head {} slot {}",
                w[0].0, w[0].1, w[0].2
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PlanLimits {
        PlanLimits {
            sequences: 2,
            kv_heads: 3,
            slots: 4,
            host_pages: 10,
        }
    }

    #[test]
    fn build_from_recalls_and_validate() {
        let mut p = RecallPlan::new(5);
        assert!(p.is_empty());
        let table = [7, 3, 9];
        let recalls = [SlotPage { page: 2, slot: 1 }, SlotPage { page: 0, slot: 3 }];
        assert_eq!(p.push_recalls(1, 2, &recalls, &table).unwrap(), 2);
        assert_eq!(
            p.entries(),
            &[
                RecallEntry {
                    seq: 1,
                    kv_head: 2,
                    host_page: 9,
                    slot: 1
                },
                RecallEntry {
                    seq: 1,
                    kv_head: 2,
                    host_page: 7,
                    slot: 3
                },
            ]
        );
        p.validate(&limits()).unwrap();
        assert_eq!(p.layer(), 5);
        let g = PageGeometry::new(32, 3, 64).unwrap();
        assert_eq!(p.bytes::<f32>(g), 2 * 2 * 32 * 64 * 4);
        // A page past the table adds nothing.
        let bad = [SlotPage { page: 1, slot: 0 }, SlotPage { page: 3, slot: 2 }];
        assert!(matches!(
            p.push_recalls(0, 0, &bad, &table),
            Err(RecallError::InvalidPlan(_))
        ));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn invalid_entries() {
        let ok = RecallEntry {
            seq: 0,
            kv_head: 0,
            host_page: 0,
            slot: 0,
        };
        for (e, msg) in [
            (RecallEntry { seq: 2, ..ok }, "sequence 2"),
            (RecallEntry { kv_head: 3, ..ok }, "kv head 3"),
            (RecallEntry { slot: 4, ..ok }, "slot 4"),
            (
                RecallEntry {
                    host_page: 10,
                    ..ok
                },
                "host page 10",
            ),
        ] {
            let mut p = RecallPlan::new(0);
            p.push(ok);
            p.push(e);
            let err = p.validate(&limits()).unwrap_err();
            assert!(err.to_string().contains(msg), "{err}");
            assert!(err.to_string().contains("entry 1"), "{err}");
        }
        let mut p = RecallPlan::new(0);
        p.push(ok);
        p.push(RecallEntry { host_page: 5, ..ok });
        let err = p.validate(&limits()).unwrap_err();
        assert!(err.to_string().contains("two entries write"), "{err}");
        assert!(RecallPlan::new(0).validate(&limits()).is_ok());
    }
}
