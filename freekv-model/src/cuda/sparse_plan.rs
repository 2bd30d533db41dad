//! The host side of one decode step of the GPU sparse policies: where each sequence's new token
//! goes in its resident slots, which page fills, which mode each sequence is in, and the slot
//! table attention reads. Pure arithmetic on the lengths (the same for every sparse layer, since
//! every layer holds the same tokens), uploaded once per step as one small buffer.

use freekv_layout::Budget;

use crate::ModelError;

/// Columns of the per-sequence info row (`seq_info`, see the GPU FreeKV contract).
pub const SEQ_INFO_WIDTH: usize = 4;

/// Mode of a sequence at one step.
pub const MODE_SKIP: i32 = 0;
/// First sparse step: evict the middle, select with the current query, recall everything.
pub const MODE_FIRST: i32 = 1;
/// Sparse step.
pub const MODE_SPARSE: i32 = 2;

/// The home slot of logical page `page` (freekv-layout's ring rule): page `p < nb` opens in slot
/// `p`; later pages open in the ring `ns + k + (p − ns − k) mod nw`.
pub fn home_slot(b: &Budget, page: usize) -> usize {
    let nb = b.total_pages();
    if page < nb {
        page
    } else {
        let base = b.sink_pages() + b.retrieved_pages();
        base + (page - base) % b.window_pages()
    }
}

/// What the device needs for one decode step of a sparse batch (all `i32`, uploaded together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// Per sequence: the append position in slot space (`slot · P + row`).
    pub spos: Vec<i32>,
    /// Per sequence: tokens attention reads through `att_table` (all pages full but the last).
    pub att_len: Vec<i32>,
    /// `[bs][4]`: pages, mode, filled slot (−1 none), filled page.
    pub seq_info: Vec<i32>,
    /// `seq_info` for the speculative selection after attention: mode "first" becomes "sparse"
    /// (the middle was refilled by this step's first selection).
    pub seq_info_spec: Vec<i32>,
    /// `[bs][3]` offload entries: (seq, physical slot page `seq·nb + slot`, logical page) of the
    /// page that became full at this step, or (−1, 0, 0).
    pub fill: Vec<i32>,
    /// `[bs][nb]` physical slot pages in attention order (the current page last), padded with the
    /// sequence's slot 0. `nb` counts the spare slots too (the attention's page mask skips the
    /// pages a head does not attend).
    pub att_table: Vec<i32>,
}

impl StepPlan {
    /// The plan's `i32` values in upload order:
    /// `spos | att_len | seq_info | seq_info_spec | fill | att_table`.
    pub fn flatten(&self) -> Vec<i32> {
        let mut v = Vec::with_capacity(
            self.spos.len()
                + self.att_len.len()
                + self.seq_info.len()
                + self.seq_info_spec.len()
                + self.fill.len()
                + self.att_table.len(),
        );
        for part in [
            &self.spos,
            &self.att_len,
            &self.seq_info,
            &self.seq_info_spec,
            &self.fill,
            &self.att_table,
        ] {
            v.extend_from_slice(part);
        }
        v
    }

    /// Whether every sequence of the step is dense (mode "skip"; the speculative rows then are
    /// too, they differ only in "first" becoming "sparse"): no selection or recall has anything
    /// to do.
    pub fn all_dense(&self) -> bool {
        self.seq_info
            .chunks(SEQ_INFO_WIDTH)
            .all(|r| r.get(1) == Some(&MODE_SKIP))
    }

    /// Element offsets of the parts in [`flatten`](Self::flatten)'s order, for `bs` sequences
    /// and `nb` slots: `[spos, att_len, seq_info, seq_info_spec, fill, att_table, end]`.
    pub fn offsets(bs: usize, nb: usize) -> [usize; 7] {
        let mut o = [0usize; 7];
        let sizes = [
            bs,
            bs,
            SEQ_INFO_WIDTH * bs,
            SEQ_INFO_WIDTH * bs,
            3 * bs,
            bs * nb,
        ];
        for (i, s) in sizes.iter().enumerate() {
            o[i + 1] = o[i] + s;
        }
        o
    }
}

/// Plan one decode step: `lens[i]` tokens are held by sequence `i` before the step (its new token
/// goes to position `lens[i]`); `active[i]` is false for rows that only carry padding;
/// `started[i]` says whether the sequence already had its first sparse step (updated here).
/// `spare` spare middle slots follow the budget's `nb` slots of every sequence.
pub fn plan_step(
    b: &Budget,
    spare: usize,
    lens: &[usize],
    active: &[bool],
    started: &mut [bool],
) -> Result<StepPlan, ModelError> {
    let bs = lens.len();
    if active.len() != bs || started.len() != bs {
        return Err(ModelError::Config(format!(
            "step plan: {} lengths, {} activity flags, {} start flags",
            bs,
            active.len(),
            started.len()
        )));
    }
    let p = b.page_size();
    let nb = b.total_pages() + spare;
    let to_i32 = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| ModelError::Config(format!("step plan: {what} {v} too large")))
    };
    let mut plan = StepPlan {
        spos: vec![0; bs],
        att_len: vec![0; bs],
        seq_info: vec![0; SEQ_INFO_WIDTH * bs],
        seq_info_spec: vec![0; SEQ_INFO_WIDTH * bs],
        fill: vec![0; 3 * bs],
        att_table: vec![0; bs * nb],
    };
    for i in 0..bs {
        let base = to_i32(i * nb, "slot page")?;
        let info = &mut plan.seq_info[SEQ_INFO_WIDTH * i..SEQ_INFO_WIDTH * (i + 1)];
        info[2] = -1;
        plan.fill[3 * i] = -1;
        for slot in 0..nb {
            plan.att_table[i * nb + slot] = base + to_i32(slot, "slot")?;
        }
        if !active[i] {
            plan.att_len[i] = 1;
            plan.seq_info_spec[SEQ_INFO_WIDTH * i + 2] = -1;
            continue;
        }
        let pos = lens[i];
        let page = pos / p;
        let row = pos % p;
        let n_pages = page + 1;
        let home = home_slot(b, page);
        plan.spos[i] = to_i32(home * p + row, "append position")?;
        info[0] = to_i32(n_pages, "page count")?;
        let sparse = b.is_sparse(n_pages);
        info[1] = if !sparse {
            MODE_SKIP
        } else if started[i] {
            MODE_SPARSE
        } else {
            MODE_FIRST
        };
        if sparse {
            started[i] = true;
        }
        if row + 1 == p {
            info[2] = to_i32(home, "slot")?;
            info[3] = to_i32(page, "page")?;
            plan.fill[3 * i] = to_i32(i, "sequence")?;
            plan.fill[3 * i + 1] = base + to_i32(home, "slot")?;
            plan.fill[3 * i + 2] = to_i32(page, "page")?;
        }
        let row_table = &mut plan.att_table[i * nb..(i + 1) * nb];
        if sparse {
            // Every slot is full but the current page's: move it last.
            for (k, slot) in (0..nb).filter(|&s| s != home).enumerate() {
                row_table[k] = base + to_i32(slot, "slot")?;
            }
            row_table[nb - 1] = base + to_i32(home, "slot")?;
            plan.att_len[i] = to_i32((nb - 1) * p + row + 1, "attention length")?;
        } else {
            // Dense phase: page j in slot j, the current page is the last one.
            plan.att_len[i] = to_i32(pos + 1, "attention length")?;
        }
        let spec = &mut plan.seq_info_spec[SEQ_INFO_WIDTH * i..SEQ_INFO_WIDTH * (i + 1)];
        spec.copy_from_slice(&plan.seq_info[SEQ_INFO_WIDTH * i..SEQ_INFO_WIDTH * (i + 1)]);
        if spec[1] == MODE_FIRST {
            spec[1] = MODE_SPARSE;
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use freekv_layout::SlotTable;

    #[test]
    fn home_slot_matches_the_slot_table() {
        let b = Budget::new(2, 3, 4, 4).unwrap();
        let mut t = SlotTable::new(b);
        for tok in 0..400 {
            t.append_tokens(1).unwrap();
            let page = tok / 4;
            assert_eq!(Some(home_slot(&b, page)), t.current_slot(), "token {tok}");
        }
    }

    #[test]
    fn one_sparse_sequence_keeps_a_step_from_being_all_dense() {
        let b = Budget::new(2, 3, 4, 4).unwrap(); // 9 pages of 4 tokens
        let mut started = vec![false; 3];
        let dense = plan_step(&b, 0, &[0, 20, 35], &[true, true, true], &mut started).unwrap();
        assert!(dense.all_dense());
        // 36 tokens + the new one: 10 pages, one more than the budget.
        let ragged = plan_step(&b, 0, &[0, 20, 36], &[true, true, true], &mut started).unwrap();
        assert!(!ragged.all_dense());
        assert!(started[2] && !started[0] && !started[1]);
        // A padding row (inactive) is dense whatever its length says.
        let padded = plan_step(&b, 0, &[5, 0, 0], &[true, false, false], &mut started).unwrap();
        assert!(padded.all_dense());
    }

    #[test]
    fn plan_walks_a_sequence_through_dense_and_sparse() {
        let b = Budget::new(2, 3, 4, 4).unwrap(); // nb = 9 pages of 4 tokens
        let nb = b.total_pages();
        // Without and with spare slots (after the budget's slots): the dense phase and the
        // home slots are the same; the sparse phase attends every physical slot.
        for spare in [0usize, 3] {
            let nbp = nb + spare;
            let mut started = vec![false, false];
            let mut table = SlotTable::new(b);
            let mut first_seen = false;
            for pos in 0..200usize {
                let plan = plan_step(&b, spare, &[pos, 0], &[true, false], &mut started).unwrap();
                table.append_tokens(1).unwrap();
                let n = pos / 4 + 1;
                let info = &plan.seq_info[0..4];
                assert_eq!(info[0] as usize, n);
                let home = table.current_slot().unwrap();
                assert_eq!(plan.spos[0] as usize, home * 4 + pos % 4);
                // the row that is never active keeps no step from being all-dense
                assert_eq!(plan.all_dense(), n <= nb);
                if n <= nb {
                    assert_eq!(info[1], MODE_SKIP);
                    assert_eq!(plan.att_len[0] as usize, pos + 1);
                    assert_eq!(
                        &plan.att_table[0..n],
                        &(0..n as i32).collect::<Vec<_>>()[..]
                    );
                } else {
                    assert_eq!(info[1], if first_seen { MODE_SPARSE } else { MODE_FIRST });
                    first_seen = true;
                    assert_eq!(plan.seq_info_spec[1], MODE_SPARSE);
                    assert_eq!(*plan.att_table.get(nbp - 1).unwrap() as usize, home);
                    let mut sorted: Vec<i32> = plan.att_table[0..nbp].to_vec();
                    sorted.sort_unstable();
                    assert_eq!(sorted, (0..nbp as i32).collect::<Vec<_>>());
                    assert_eq!(plan.att_len[0] as usize, (nbp - 1) * 4 + pos % 4 + 1);
                }
                if pos % 4 == 3 {
                    assert_eq!((info[2], info[3]), (home as i32, (pos / 4) as i32));
                    assert_eq!(&plan.fill[0..3], &[0, home as i32, (pos / 4) as i32]);
                } else {
                    assert_eq!(info[2], -1);
                    assert_eq!(plan.fill[0], -1);
                }
                // the inactive row never does anything
                assert_eq!(&plan.seq_info[4..8], &[0, MODE_SKIP, -1, 0]);
                assert_eq!(plan.fill[3], -1);
                assert_eq!(plan.att_table[nbp], nbp as i32);
            }
            assert!(first_seen);
            let flat = plan_step(&b, spare, &[5, 6], &[true, true], &mut started).unwrap();
            let o = StepPlan::offsets(2, nbp);
            assert_eq!(flat.flatten().len(), o[6]);
            assert_eq!(flat.flatten()[o[5]..o[6]], flat.att_table[..]);
            assert!(plan_step(&b, spare, &[1], &[true, true], &mut started).is_err());
        }
    }
}
