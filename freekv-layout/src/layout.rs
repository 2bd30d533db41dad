//! The two page layouts and the CPU transposes between them.
//!
//! * **NHD** (device): `[2][page_size][kv_heads][head_dim]` — one token row holds every head, which is
//!   what the append and paged-attention kernels want.
//! * **HND** (host): `[kv_heads][2][page_size][head_dim]` — one (page, KV head) *unit* (K block then V
//!   block, `2·P·d` elements) is contiguous, so recalling one head of one page is a single copy.
//!
//! Both layouts have the same number of elements per page, so host and device page strides agree.
//! Every function here is generic over `T: Copy` (f32 on the CPU path, `half::bf16` for the GPU
//! reference) and checks buffer sizes first: a wrong size is a [`LayoutError::SizeMismatch`], never
//! a panic. These functions are the CPU reference the GPU offload/recall kernels are tested against.

use crate::{LayoutError, PageGeometry};

/// Which of the two page layouts a buffer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageLayout {
    /// `[2][page_size][kv_heads][head_dim]` (device pages, resident slots).
    Nhd,
    /// `[kv_heads][2][page_size][head_dim]` (host pages).
    Hnd,
}

impl PageLayout {
    /// Offset of element (`kv` (0 = K, 1 = V), `token`, `head`, `dim`) within one page of this
    /// layout. Arguments are not range-checked (index math only).
    #[inline]
    pub fn index(
        self,
        geom: PageGeometry,
        kv: usize,
        token: usize,
        head: usize,
        dim: usize,
    ) -> usize {
        match self {
            PageLayout::Nhd => geom.nhd_index(kv, token, head, dim),
            PageLayout::Hnd => geom.hnd_index(head, kv, token, dim),
        }
    }
}

impl std::fmt::Display for PageLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PageLayout::Nhd => "NHD",
            PageLayout::Hnd => "HND",
        })
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), LayoutError> {
    if expected == got {
        Ok(())
    } else {
        Err(LayoutError::SizeMismatch {
            what,
            expected,
            got,
        })
    }
}

fn check_head(geom: PageGeometry, head: usize) -> Result<(), LayoutError> {
    if head < geom.kv_heads {
        Ok(())
    } else {
        Err(LayoutError::OutOfRange {
            what: "kv head",
            index: head,
            limit: geom.kv_heads,
        })
    }
}

/// Transpose one whole page from NHD (`src`) to HND (`dst`). Both must hold
/// [`PageGeometry::page_elems`] elements.
pub fn nhd_to_hnd<T: Copy>(
    geom: PageGeometry,
    src: &[T],
    dst: &mut [T],
) -> Result<(), LayoutError> {
    let n = geom.page_elems();
    check_len("NHD source page", n, src.len())?;
    check_len("HND destination page", n, dst.len())?;
    let d = geom.head_dim;
    let row = geom.kv_heads * d;
    // dst = [Hkv] units of [2·P] rows of d; src = [2·P] rows of [Hkv][d].
    for (head, unit) in dst.chunks_exact_mut(geom.head_unit_elems()).enumerate() {
        let off = head * d;
        for (out, src_row) in unit.chunks_exact_mut(d).zip(src.chunks_exact(row)) {
            out.copy_from_slice(&src_row[off..off + d]);
        }
    }
    Ok(())
}

/// Transpose one whole page from HND (`src`) to NHD (`dst`). Both must hold
/// [`PageGeometry::page_elems`] elements.
pub fn hnd_to_nhd<T: Copy>(
    geom: PageGeometry,
    src: &[T],
    dst: &mut [T],
) -> Result<(), LayoutError> {
    let n = geom.page_elems();
    check_len("HND source page", n, src.len())?;
    check_len("NHD destination page", n, dst.len())?;
    for (head, unit) in src.chunks_exact(geom.head_unit_elems()).enumerate() {
        scatter_unit(geom, head, unit, dst);
    }
    Ok(())
}

/// Write one (page, KV head) unit given in HND order (`unit_src`: K block then V block, `2·P·d`
/// elements) into the `head` slice of an NHD page (`nhd_page_dst`, a whole page); the other heads of
/// the destination page are left untouched. This is what a recall does per planned unit.
pub fn hnd_unit_to_nhd_slice<T: Copy>(
    geom: PageGeometry,
    head: usize,
    unit_src: &[T],
    nhd_page_dst: &mut [T],
) -> Result<(), LayoutError> {
    check_head(geom, head)?;
    check_len("HND source unit", geom.head_unit_elems(), unit_src.len())?;
    check_len(
        "NHD destination page",
        geom.page_elems(),
        nhd_page_dst.len(),
    )?;
    scatter_unit(geom, head, unit_src, nhd_page_dst);
    Ok(())
}

/// Read the `head` slice of an NHD page (`nhd_page_src`) into one contiguous HND unit (`unit_dst`,
/// `2·P·d` elements): the per-head inverse of [`hnd_unit_to_nhd_slice`] (offload of one head).
pub fn nhd_slice_to_hnd_unit<T: Copy>(
    geom: PageGeometry,
    head: usize,
    nhd_page_src: &[T],
    unit_dst: &mut [T],
) -> Result<(), LayoutError> {
    check_head(geom, head)?;
    check_len("NHD source page", geom.page_elems(), nhd_page_src.len())?;
    check_len(
        "HND destination unit",
        geom.head_unit_elems(),
        unit_dst.len(),
    )?;
    let d = geom.head_dim;
    let off = head * d;
    for (out, src_row) in unit_dst
        .chunks_exact_mut(d)
        .zip(nhd_page_src.chunks_exact(geom.kv_heads * d))
    {
        out.copy_from_slice(&src_row[off..off + d]);
    }
    Ok(())
}

/// Unchecked core of the unit scatter: sizes were validated by the caller.
#[inline]
fn scatter_unit<T: Copy>(geom: PageGeometry, head: usize, unit: &[T], nhd: &mut [T]) {
    let d = geom.head_dim;
    let off = head * d;
    // unit = [2·P] rows of d; nhd = [2·P] rows of [Hkv][d]: row r of the unit is row r of the page.
    for (src_row, dst_row) in unit
        .chunks_exact(d)
        .zip(nhd.chunks_exact_mut(geom.kv_heads * d))
    {
        dst_row[off..off + d].copy_from_slice(src_row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> Vec<u32> {
        (0..n as u32).collect()
    }

    #[test]
    fn whole_page_round_trip_matches_index_math() {
        let g = PageGeometry::new(3, 2, 4).unwrap();
        let nhd = numbered(g.page_elems());
        let mut hnd = vec![0u32; g.page_elems()];
        nhd_to_hnd(g, &nhd, &mut hnd).unwrap();
        for kv in 0..2 {
            for t in 0..3 {
                for h in 0..2 {
                    for x in 0..4 {
                        assert_eq!(
                            hnd[PageLayout::Hnd.index(g, kv, t, h, x)],
                            nhd[PageLayout::Nhd.index(g, kv, t, h, x)]
                        );
                    }
                }
            }
        }
        let mut back = vec![0u32; g.page_elems()];
        hnd_to_nhd(g, &hnd, &mut back).unwrap();
        assert_eq!(back, nhd);
    }

    #[test]
    fn unit_scatter_touches_only_its_head() {
        let g = PageGeometry::new(2, 3, 2).unwrap();
        let unit: Vec<u32> = (100..100 + g.head_unit_elems() as u32).collect();
        let mut page = vec![7u32; g.page_elems()];
        hnd_unit_to_nhd_slice(g, 1, &unit, &mut page).unwrap();
        for kv in 0..2 {
            for t in 0..2 {
                for h in 0..3 {
                    for x in 0..2 {
                        let got = page[g.nhd_index(kv, t, h, x)];
                        let want = if h == 1 {
                            unit[(kv * 2 + t) * 2 + x]
                        } else {
                            7
                        };
                        assert_eq!(got, want);
                    }
                }
            }
        }
        let mut unit_back = vec![0u32; g.head_unit_elems()];
        nhd_slice_to_hnd_unit(g, 1, &page, &mut unit_back).unwrap();
        assert_eq!(unit_back, unit);
    }

    #[test]
    fn bad_sizes_and_heads_are_errors() {
        let g = PageGeometry::new(2, 2, 2).unwrap();
        let n = g.page_elems();
        let mut dst = vec![0u8; n];
        assert!(matches!(
            nhd_to_hnd(g, &vec![0u8; n - 1], &mut dst),
            Err(LayoutError::SizeMismatch { .. })
        ));
        assert!(matches!(
            hnd_to_nhd(g, &vec![0u8; n], &mut dst[..n - 1]),
            Err(LayoutError::SizeMismatch { .. })
        ));
        let unit = vec![0u8; g.head_unit_elems()];
        assert!(matches!(
            hnd_unit_to_nhd_slice(g, 2, &unit, &mut dst),
            Err(LayoutError::OutOfRange { .. })
        ));
        assert!(hnd_unit_to_nhd_slice(g, 1, &unit[1..], &mut dst).is_err());
        let mut short = vec![0u8; g.head_unit_elems() + 1];
        assert!(nhd_slice_to_hnd_unit(g, 0, &dst, &mut short).is_err());
        assert_eq!(PageLayout::Nhd.to_string(), "NHD");
    }
}
