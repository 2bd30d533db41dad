//! Run statistics helpers.

/// Overlap of two consecutive selections: `|prev ∩ cur| / |cur|` — the fraction of the current
/// selection that was already selected at the previous step (1.0: nothing new to recall).
/// Pages may come in any order; duplicates count once. `None` when `cur` is empty.
pub fn selection_overlap(prev: &[usize], cur: &[usize]) -> Option<f64> {
    let mut a = prev.to_vec();
    a.sort_unstable();
    a.dedup();
    let mut b = cur.to_vec();
    b.sort_unstable();
    b.dedup();
    if b.is_empty() {
        return None;
    }
    let common = b.iter().filter(|p| a.binary_search(p).is_ok()).count();
    Some(common as f64 / b.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_by_hand() {
        assert_eq!(selection_overlap(&[1, 2, 3, 4], &[3, 4, 5, 6]), Some(0.5));
        assert_eq!(selection_overlap(&[9, 8], &[8, 9]), Some(1.0));
        assert_eq!(selection_overlap(&[], &[1, 2, 3]), Some(0.0));
        assert_eq!(selection_overlap(&[1], &[1, 2, 2, 5]), Some(1.0 / 3.0));
        assert_eq!(selection_overlap(&[1, 2], &[]), None);
        // |A∩B|/|B|, not symmetric
        assert_eq!(selection_overlap(&[1, 2, 3, 4], &[1]), Some(1.0));
        assert_eq!(selection_overlap(&[1], &[1, 2, 3, 4]), Some(0.25));
    }
}
