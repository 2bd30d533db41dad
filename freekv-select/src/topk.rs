//! Candidate pages and the deterministic top-k.

use std::ops::Range;

use crate::SelectError;

/// Order-preserving map from an fp32 score to a `u32` (larger score → larger key), with
/// `-0.0 ↦ key(+0.0)` and every NaN ↦ 0 (below `-∞`).
#[inline]
pub fn score_key(score: f32) -> u32 {
    if score.is_nan() {
        return 0;
    }
    // Canonicalise -0.0 to +0.0 so that the two tie.
    let s = if score == 0.0 { 0.0f32 } else { score };
    let bits = s.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The total ranking key of (score, page): larger key = better rank. Higher score first; on
/// equal scores the lower page index first.
#[inline]
pub fn rank_key(score: f32, page: u32) -> u64 {
    ((score_key(score) as u64) << 32) | (!page) as u64
}

/// The page index encoded in a [`rank_key`].
#[inline]
pub fn page_of_key(key: u64) -> u32 {
    !(key as u32)
}

/// Candidate logical pages of a sequence with `n_pages` pages (the partial last page included):
/// `sink_pages .. n_pages − window_pages`, empty when the sinks and the window cover everything.
/// The window is the last `window_pages` logical pages, so it contains the partial page.
pub fn candidate_range(n_pages: usize, sink_pages: usize, window_pages: usize) -> Range<usize> {
    let end = n_pages.saturating_sub(window_pages);
    if end <= sink_pages {
        sink_pages..sink_pages
    } else {
        sink_pages..end
    }
}

/// The `k` best pages among `scores` (`scores[i]` is the score of page `first_page + i`), best
/// first, in the order below. `k ≥ scores.len()` returns every page.
///
/// O(n) selection (`select_nth_unstable` on the total key) then a sort of the `k` winners.
///
/// # Order
///
/// Pages are ranked by their fp32 group score, higher first; equal scores rank the **lower page
/// index** first. "Equal" is IEEE equality, so `-0.0` ties with `+0.0`; a NaN score (only possible
/// from non-finite inputs) ranks below every number. The order is encoded in one `u64`
/// ([`rank_key`]): the score's bits mapped to an order-preserving unsigned key in the high half,
/// the complemented page index in the low half. All keys of distinct pages differ, so the top-k
/// set and its order are unique, whatever algorithm computes them — a GPU radix select over the
/// same keys gives the same answer.
pub fn top_k(scores: &[f32], first_page: usize, k: usize) -> Result<Vec<usize>, SelectError> {
    let mut keys = rank_keys(scores, first_page)?;
    Ok(top_k_keys(&mut keys, k))
}

/// Check that pages `first_page .. first_page + count` fit the `u32` page index of a rank key.
pub(crate) fn check_page_span(first_page: usize, count: usize) -> Result<(), SelectError> {
    let end = first_page.checked_add(count);
    if end.is_none_or(|e| e > u32::MAX as usize) {
        return Err(SelectError::InvalidPageSet {
            what: "candidate pages",
            reason: format!(
                "pages {first_page}.. (+{count}) exceed the supported page index range"
            ),
        });
    }
    Ok(())
}

/// Rank keys of `scores[i]` for page `first_page + i`.
pub(crate) fn rank_keys(scores: &[f32], first_page: usize) -> Result<Vec<u64>, SelectError> {
    check_page_span(first_page, scores.len())?;
    Ok(scores
        .iter()
        .enumerate()
        .map(|(i, &s)| rank_key(s, (first_page + i) as u32))
        .collect())
}

/// Top-k over rank keys (consumes the order of `keys`), best first.
pub(crate) fn top_k_keys(keys: &mut [u64], k: usize) -> Vec<usize> {
    let _span = tracing::debug_span!("top_k", n = keys.len(), k).entered();
    let k = k.min(keys.len());
    if k == 0 {
        return Vec::new();
    }
    if k < keys.len() {
        keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    }
    let winners = &mut keys[..k];
    winners.sort_unstable_by(|a, b| b.cmp(a));
    winners
        .iter()
        .map(|&key| page_of_key(key) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_key_is_monotone() {
        let vals = [
            f32::NEG_INFINITY,
            -3.0e38,
            -2.0,
            -1.0e-40,
            0.0,
            1.0e-40,
            1.0,
            3.0e38,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(score_key(w[0]) < score_key(w[1]), "{} vs {}", w[0], w[1]);
        }
        assert_eq!(score_key(-0.0), score_key(0.0));
        assert!(score_key(f32::NAN) < score_key(f32::NEG_INFINITY));
        assert_eq!(score_key(-f32::NAN), 0);
    }

    #[test]
    fn rank_key_orders_ties_by_page() {
        assert!(rank_key(1.0, 3) > rank_key(1.0, 4));
        assert!(rank_key(1.5, 9) > rank_key(1.0, 0));
        assert_eq!(page_of_key(rank_key(-2.0, 77)), 77);
    }

    #[test]
    fn candidates() {
        assert_eq!(candidate_range(10, 2, 3), 2..7);
        assert_eq!(candidate_range(5, 2, 3), 2..2);
        assert_eq!(candidate_range(3, 2, 3), 2..2);
        assert_eq!(candidate_range(0, 0, 1), 0..0);
        assert_eq!(candidate_range(4, 0, 1), 0..3);
    }

    #[test]
    fn top_k_with_ties() {
        // pages 10..16 with scores
        let s = [1.0, 3.0, 1.0, 3.0, 2.0, -0.0, 0.0];
        assert_eq!(top_k(&s, 10, 3).unwrap(), vec![11, 13, 14]);
        assert_eq!(top_k(&s, 10, 4).unwrap(), vec![11, 13, 14, 10]);
        assert_eq!(top_k(&s, 10, 5).unwrap(), vec![11, 13, 14, 10, 12]);
        // -0.0 (page 15) ties with +0.0 (page 16): lower page wins
        assert_eq!(top_k(&s, 10, 6).unwrap(), vec![11, 13, 14, 10, 12, 15]);
        assert_eq!(top_k(&s, 10, 7).unwrap().len(), 7);
        assert_eq!(top_k(&s, 10, 100).unwrap().len(), 7);
        assert!(top_k(&s, 10, 0).unwrap().is_empty());
        assert!(top_k(&[], 0, 3).unwrap().is_empty());
        assert!(top_k(&[f32::NAN, -1.0], 0, 1).unwrap() == vec![1]);
        assert!(top_k(&s, u32::MAX as usize, 1).is_err());
    }
}
