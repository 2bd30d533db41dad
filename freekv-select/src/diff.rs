//! Turning a selection into kept / to-recall / victims against the resident middle pages.

use crate::SelectError;
use crate::topk::{check_page_span, page_of_key, rank_key};

/// What changes in the resident middle ("retrieved") slots when a new selection takes effect.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SelectionDiff {
    /// Selected pages already resident, ascending page index.
    pub kept: Vec<usize>,
    /// Selected pages not resident: to fetch from the host, ascending page index.
    pub to_recall: Vec<usize>,
    /// Resident, unselected pages to evict, worst-ranked first (lowest score first; on equal
    /// scores the higher page index first — the bottom of the same order the top-k uses).
    /// Exactly as many as needed to make room: `to_recall.len()` minus the free slots, never
    /// negative. `to_recall[i]` goes into the slot of `victims[i]`; the remaining
    /// `to_recall[victims.len()..]` go into free slots. Unselected residents that are not victims
    /// stay resident.
    pub victims: Vec<usize>,
}

fn sorted_unique(
    pages: &[usize],
    what: &'static str,
    range: &std::ops::Range<usize>,
) -> Result<Vec<usize>, SelectError> {
    let mut v = pages.to_vec();
    v.sort_unstable();
    if let Some(w) = v.windows(2).find(|w| w[0] == w[1]) {
        return Err(SelectError::InvalidPageSet {
            what,
            reason: format!("page {} appears twice", w[0]),
        });
    }
    if let Some(&p) = v.iter().find(|p| !range.contains(p)) {
        return Err(SelectError::InvalidPageSet {
            what,
            reason: format!(
                "page {p} is not a candidate page (candidates are {}..{})",
                range.start, range.end
            ),
        });
    }
    Ok(v)
}

/// Diff a selection against the resident middle pages.
///
/// * `selected`, `resident`: logical page indices (any order, no duplicates), all of them
///   candidate pages `first_page .. first_page + scores.len()`;
/// * `capacity`: middle slots available (`k`); neither set may exceed it;
/// * `scores[i]`: group score of candidate page `first_page + i` (used to rank victims).
///
/// See [`SelectionDiff`] for the result. Errors on duplicates, non-candidate pages or sets larger
/// than `capacity`.
pub fn diff_selection(
    selected: &[usize],
    resident: &[usize],
    capacity: usize,
    scores: &[f32],
    first_page: usize,
) -> Result<SelectionDiff, SelectError> {
    check_page_span(first_page, scores.len())?;
    let range = first_page..first_page + scores.len();
    for (what, set) in [("selection", selected), ("resident set", resident)] {
        if set.len() > capacity {
            return Err(SelectError::InvalidPageSet {
                what,
                reason: format!("{} pages exceed the capacity of {capacity}", set.len()),
            });
        }
    }
    let sel = sorted_unique(selected, "selection", &range)?;
    let res = sorted_unique(resident, "resident set", &range)?;

    let mut diff = SelectionDiff::default();
    let mut unselected = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < sel.len() || j < res.len() {
        match (sel.get(i), res.get(j)) {
            (Some(&s), Some(&r)) if s == r => {
                diff.kept.push(s);
                i += 1;
                j += 1;
            }
            (Some(&s), Some(&r)) if s < r => {
                diff.to_recall.push(s);
                i += 1;
            }
            (Some(&s), None) => {
                diff.to_recall.push(s);
                i += 1;
            }
            (_, Some(&r)) => {
                unselected.push(r);
                j += 1;
            }
            (None, None) => break,
        }
    }
    let free = capacity - res.len();
    let needed = diff.to_recall.len().saturating_sub(free);
    if needed > 0 {
        let mut keys: Vec<u64> = unselected
            .iter()
            .map(|&p| {
                let s = scores.get(p - first_page).copied().unwrap_or(f32::NAN);
                rank_key(s, p as u32)
            })
            .collect();
        // `needed ≤ unselected.len()`: |sel| ≤ capacity ⇒ |to_recall| − free ≤ |res| − |kept|.
        let needed = needed.min(keys.len());
        if needed < keys.len() {
            keys.select_nth_unstable(needed - 1);
        }
        let worst = &mut keys[..needed];
        worst.sort_unstable();
        diff.victims = worst.iter().map(|&k| page_of_key(k) as usize).collect();
    }
    Ok(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    // candidates 10..20, score = (page % 4) as f32 → pages 13, 17 best; 10, 14, 18 worst
    fn scores() -> Vec<f32> {
        (10..20).map(|p| (p % 4) as f32).collect()
    }

    #[test]
    fn general_case() {
        let s = scores();
        let d = diff_selection(&[17, 13, 15, 11], &[12, 13, 14, 16], 4, &s, 10).unwrap();
        assert_eq!(d.kept, vec![13]);
        assert_eq!(d.to_recall, vec![11, 15, 17]);
        // unselected residents: 12 (score 0), 14 (2), 16 (0): worst first, ties → higher page first
        assert_eq!(d.victims, vec![16, 12, 14]);
    }

    #[test]
    fn free_slots_reduce_victims() {
        let s = scores();
        // capacity 5, 3 resident → 2 free; 3 to recall → 1 victim
        let d = diff_selection(&[11, 15, 17], &[12, 14, 16], 5, &s, 10).unwrap();
        assert_eq!(d.to_recall, vec![11, 15, 17]);
        assert_eq!(d.victims, vec![16]);
        // capacity 6 → no victim, unselected stay resident
        let d = diff_selection(&[11, 15, 17], &[12, 14, 16], 6, &s, 10).unwrap();
        assert!(d.victims.is_empty());
    }

    #[test]
    fn nothing_resident() {
        let s = scores();
        let d = diff_selection(&[19, 10, 12], &[], 3, &s, 10).unwrap();
        assert!(d.kept.is_empty() && d.victims.is_empty());
        assert_eq!(d.to_recall, vec![10, 12, 19]);
    }

    #[test]
    fn everything_resident() {
        let s = scores();
        let d = diff_selection(&[19, 10, 12], &[12, 10, 19], 3, &s, 10).unwrap();
        assert_eq!(d.kept, vec![10, 12, 19]);
        assert!(d.to_recall.is_empty() && d.victims.is_empty());
        // empty selection against residents: nothing to do
        let d = diff_selection(&[], &[12, 10], 3, &s, 10).unwrap();
        assert_eq!(d, SelectionDiff::default());
    }

    #[test]
    fn errors() {
        let s = scores();
        assert!(diff_selection(&[11, 11], &[], 4, &s, 10).is_err());
        assert!(diff_selection(&[11], &[12, 12], 4, &s, 10).is_err());
        assert!(diff_selection(&[9], &[], 4, &s, 10).is_err());
        assert!(diff_selection(&[11], &[20], 4, &s, 10).is_err());
        assert!(diff_selection(&[11, 12, 13], &[], 2, &s, 10).is_err());
        assert!(diff_selection(&[], &[11, 12, 13], 2, &s, 10).is_err());
    }
}
