//! The resident ("device-side") KV buffer of the CPU backend: NHD pages indexed by slot.

use crate::layout::{hnd_unit_to_nhd_slice, nhd_slice_to_hnd_unit};
use crate::{LayoutError, PageGeometry};

/// A fixed number of resident page slots in NHD layout, `[slots][2][P][Hkv][d]`: the CPU stand-in
/// for the device page pool of one (sequence, layer). The CPU decoder appends the current token
/// into it and its attention reads it; the recall engine writes recalled (page, head) units into
/// it. Slot meaning (which logical page, per head) is kept by
/// [`SlotTable`](crate::SlotTable)/[`LayerResidency`](crate::LayerResidency).
#[derive(Debug, Clone, PartialEq)]
pub struct SlotPool<T> {
    geom: PageGeometry,
    slots: usize,
    data: Vec<T>,
}

impl<T: Copy + Default> SlotPool<T> {
    /// `slots` zero-filled NHD pages. Fails on a size overflow or when memory is short.
    pub fn new(geom: PageGeometry, slots: usize) -> Result<Self, LayoutError> {
        let n = slots
            .checked_mul(geom.page_elems())
            .ok_or_else(|| LayoutError::InvalidGeometry(format!("{slots} slots overflow")))?;
        let mut data = Vec::new();
        data.try_reserve_exact(n)
            .map_err(|_| LayoutError::PoolExhausted {
                max_pages: slots,
                page_bytes: geom.page_elems() * std::mem::size_of::<T>(),
            })?;
        data.resize(n, T::default());
        Ok(Self { geom, slots, data })
    }

    /// Set every element to `value` (tests poison buffers with it).
    pub fn fill(&mut self, value: T) {
        self.data.iter_mut().for_each(|x| *x = value);
    }
}

impl<T> SlotPool<T> {
    /// Page geometry.
    pub fn geometry(&self) -> PageGeometry {
        self.geom
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The whole buffer, `[slots][2][P][Hkv][d]`.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
}

impl<T: Copy> SlotPool<T> {
    fn range(&self, slot: usize) -> Result<std::ops::Range<usize>, LayoutError> {
        if slot >= self.slots {
            return Err(LayoutError::OutOfRange {
                what: "slot",
                index: slot,
                limit: self.slots,
            });
        }
        let e = self.geom.page_elems();
        Ok(slot * e..(slot + 1) * e)
    }

    /// One NHD page (`[2][P][Hkv][d]`).
    pub fn page(&self, slot: usize) -> Result<&[T], LayoutError> {
        let r = self.range(slot)?;
        Ok(&self.data[r])
    }

    /// One NHD page, mutable.
    pub fn page_mut(&mut self, slot: usize) -> Result<&mut [T], LayoutError> {
        let r = self.range(slot)?;
        Ok(&mut self.data[r])
    }

    /// The keys of a slot, `[P][Hkv][d]` (token-major; row `t`, head `h` at `(t·Hkv + h)·d`).
    pub fn keys(&self, slot: usize) -> Result<&[T], LayoutError> {
        let half = self.geom.page_elems() / 2;
        Ok(&self.page(slot)?[..half])
    }

    /// The values of a slot, laid out like [`keys`](Self::keys).
    pub fn values(&self, slot: usize) -> Result<&[T], LayoutError> {
        let half = self.geom.page_elems() / 2;
        Ok(&self.page(slot)?[half..])
    }

    fn row_range(
        &self,
        kv: usize,
        row: usize,
        head: usize,
    ) -> Result<std::ops::Range<usize>, LayoutError> {
        let g = self.geom;
        if row >= g.page_size {
            return Err(LayoutError::OutOfRange {
                what: "token row",
                index: row,
                limit: g.page_size,
            });
        }
        if head >= g.kv_heads {
            return Err(LayoutError::OutOfRange {
                what: "kv head",
                index: head,
                limit: g.kv_heads,
            });
        }
        let s = g.nhd_index(kv, row, head, 0);
        Ok(s..s + g.head_dim)
    }

    /// The key of token `row` of `slot` for KV `head` (`d` elements).
    pub fn key_row(&self, slot: usize, row: usize, head: usize) -> Result<&[T], LayoutError> {
        let r = self.row_range(0, row, head)?;
        Ok(&self.page(slot)?[r])
    }

    /// The value of token `row` of `slot` for KV `head` (`d` elements).
    pub fn value_row(&self, slot: usize, row: usize, head: usize) -> Result<&[T], LayoutError> {
        let r = self.row_range(1, row, head)?;
        Ok(&self.page(slot)?[r])
    }

    /// Write one token (all heads): `k` and `v` hold `Hkv·d` elements, head-major — in NHD a
    /// token's row is contiguous, so this is two copies.
    pub fn write_token(
        &mut self,
        slot: usize,
        row: usize,
        k: &[T],
        v: &[T],
    ) -> Result<(), LayoutError> {
        let g = self.geom;
        let n = g.kv_heads * g.head_dim;
        for (what, x) in [("token keys", k), ("token values", v)] {
            if x.len() != n {
                return Err(LayoutError::SizeMismatch {
                    what,
                    expected: n,
                    got: x.len(),
                });
            }
        }
        let kr = self.row_range(0, row, 0)?.start;
        let vr = self.row_range(1, row, 0)?.start;
        let page = self.page_mut(slot)?;
        page[kr..kr + n].copy_from_slice(k);
        page[vr..vr + n].copy_from_slice(v);
        Ok(())
    }

    /// Write one HND (page, head) unit (`2·P·d` elements) into the `head` slice of `slot`.
    pub fn write_head_unit(
        &mut self,
        slot: usize,
        head: usize,
        unit: &[T],
    ) -> Result<(), LayoutError> {
        let g = self.geom;
        hnd_unit_to_nhd_slice(g, head, unit, self.page_mut(slot)?)
    }

    /// Read the `head` slice of `slot` into one HND unit (`2·P·d` elements).
    pub fn read_head_unit(
        &self,
        slot: usize,
        head: usize,
        out: &mut [T],
    ) -> Result<(), LayoutError> {
        nhd_slice_to_hnd_unit(self.geom, head, self.page(slot)?, out)
    }

    /// Copy a whole page from slot `src` to slot `dst`.
    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<(), LayoutError> {
        let s = self.range(src)?;
        let d = self.range(dst)?;
        self.data.copy_within(s, d.start);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rows_and_units() {
        let g = PageGeometry::new(2, 2, 3).unwrap();
        let mut p = SlotPool::<i32>::new(g, 3).unwrap();
        let k = [1, 2, 3, 4, 5, 6];
        let v = [-1, -2, -3, -4, -5, -6];
        p.write_token(1, 1, &k, &v).unwrap();
        assert_eq!(p.key_row(1, 1, 1).unwrap(), &[4, 5, 6]);
        assert_eq!(p.value_row(1, 1, 0).unwrap(), &[-1, -2, -3]);
        assert_eq!(&p.keys(1).unwrap()[6..12], &k);
        assert_eq!(&p.values(1).unwrap()[6..12], &v);
        let mut unit = vec![0; g.head_unit_elems()];
        p.read_head_unit(1, 1, &mut unit).unwrap();
        assert_eq!(unit, vec![0, 0, 0, 4, 5, 6, 0, 0, 0, -4, -5, -6]);
        p.write_head_unit(2, 0, &unit).unwrap();
        assert_eq!(p.key_row(2, 1, 0).unwrap(), &[4, 5, 6]);
        assert_eq!(p.key_row(2, 1, 1).unwrap(), &[0, 0, 0]);
        p.copy_slot(1, 0).unwrap();
        assert_eq!(p.page(0).unwrap(), p.page(1).unwrap());
        assert!(p.page(3).is_err());
        assert!(p.key_row(0, 2, 0).is_err());
        assert!(p.key_row(0, 0, 2).is_err());
        assert!(p.write_token(0, 0, &k[1..], &v).is_err());
        assert!(p.write_head_unit(0, 0, &unit[1..]).is_err());
        assert!(SlotPool::<u8>::new(g, usize::MAX).is_err());
        p.fill(9);
        assert!(p.as_slice().iter().all(|&x| x == 9));
    }
}
