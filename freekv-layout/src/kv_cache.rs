use crate::{HostPagePool, LayoutError, PageGeometry, PageId};

/// The paged KV cache of one sequence on the CPU: f32 pages in HND layout, one page table per
/// layer (logical page → host page), tokens appended one at a time per layer.
///
/// This is the full history that FreeKV policies select from; the CPU decoder's dense attention
/// reads it directly.
#[derive(Debug)]
pub struct PagedKvCache {
    geom: PageGeometry,
    pool: HostPagePool<f32>,
    /// Per layer: logical page index → host page.
    tables: Vec<Vec<PageId>>,
    /// Per layer: tokens stored.
    lens: Vec<usize>,
}

impl PagedKvCache {
    /// A cache for `layers` layers; `max_pages` bounds the host pool over all layers.
    pub fn new(
        geom: PageGeometry,
        layers: usize,
        max_pages: Option<usize>,
    ) -> Result<Self, LayoutError> {
        if layers == 0 {
            return Err(LayoutError::InvalidGeometry(
                "a KV cache needs at least one layer".into(),
            ));
        }
        Ok(Self {
            geom,
            pool: HostPagePool::new(geom, max_pages),
            tables: vec![Vec::new(); layers],
            lens: vec![0; layers],
        })
    }

    /// Page geometry.
    pub fn geometry(&self) -> PageGeometry {
        self.geom
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.tables.len()
    }

    /// Tokens stored for `layer` (0 for an unknown layer).
    pub fn len(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }

    /// True when no layer holds any token.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Logical pages of `layer`, the partially filled last one included.
    pub fn num_pages(&self, layer: usize) -> usize {
        self.tables.get(layer).map_or(0, Vec::len)
    }

    /// Valid tokens in logical page `page` of `layer`.
    pub fn page_len(&self, layer: usize, page: usize) -> usize {
        let len = self.len(layer);
        let start = page * self.geom.page_size;
        len.saturating_sub(start).min(self.geom.page_size)
    }

    /// The host page table of `layer` (logical page → host page id).
    pub fn page_table(&self, layer: usize) -> Result<&[PageId], LayoutError> {
        self.tables
            .get(layer)
            .map(Vec::as_slice)
            .ok_or(LayoutError::OutOfRange {
                what: "layer",
                index: layer,
                limit: self.tables.len(),
            })
    }

    /// The host page pool (read access for recall engines).
    pub fn pool(&self) -> &HostPagePool<f32> {
        &self.pool
    }

    /// Append one token's keys and values (`kv_heads * head_dim` each, head-major) to `layer`.
    /// On error nothing is changed.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), LayoutError> {
        let g = self.geom;
        let n = g.kv_heads * g.head_dim;
        if k.len() != n {
            return Err(LayoutError::SizeMismatch {
                what: "appended keys",
                expected: n,
                got: k.len(),
            });
        }
        if v.len() != n {
            return Err(LayoutError::SizeMismatch {
                what: "appended values",
                expected: n,
                got: v.len(),
            });
        }
        let nlayers = self.tables.len();
        let pos = *self.lens.get(layer).ok_or(LayoutError::OutOfRange {
            what: "layer",
            index: layer,
            limit: nlayers,
        })?;
        let t = pos % g.page_size;
        if t == 0 {
            let id = self.pool.alloc()?;
            self.tables[layer].push(id);
        }
        let id = *self.tables[layer]
            .last()
            .ok_or(LayoutError::BadPage(u32::MAX))?;
        let page = self.pool.page_mut(id)?;
        for h in 0..g.kv_heads {
            let src = h * g.head_dim..(h + 1) * g.head_dim;
            let kd = g.hnd_index(h, 0, t, 0);
            page[kd..kd + g.head_dim].copy_from_slice(&k[src.clone()]);
            let vd = g.hnd_index(h, 1, t, 0);
            page[vd..vd + g.head_dim].copy_from_slice(&v[src]);
        }
        self.lens[layer] = pos + 1;
        Ok(())
    }

    fn block(
        &self,
        layer: usize,
        page: usize,
        head: usize,
        kv: usize,
    ) -> Result<&[f32], LayoutError> {
        let g = self.geom;
        let table = self.page_table(layer)?;
        let id = *table.get(page).ok_or(LayoutError::OutOfRange {
            what: "page",
            index: page,
            limit: table.len(),
        })?;
        if head >= g.kv_heads {
            return Err(LayoutError::OutOfRange {
                what: "kv head",
                index: head,
                limit: g.kv_heads,
            });
        }
        let p = self.pool.page(id)?;
        let s = g.hnd_index(head, kv, 0, 0);
        Ok(&p[s..s + g.head_block_elems()])
    }

    /// Keys of (`layer`, logical `page`, `head`): `page_size * head_dim` elements, token-major;
    /// only the first [`page_len`](Self::page_len) rows are valid.
    pub fn keys(&self, layer: usize, page: usize, head: usize) -> Result<&[f32], LayoutError> {
        self.block(layer, page, head, 0)
    }

    /// Values of (`layer`, logical `page`, `head`), laid out like [`keys`](Self::keys).
    pub fn values(&self, layer: usize, page: usize, head: usize) -> Result<&[f32], LayoutError> {
        self.block(layer, page, head, 1)
    }

    /// Drop every token of every layer and return all pages to the pool.
    pub fn clear(&mut self) {
        for table in &mut self.tables {
            for id in table.drain(..) {
                // Ids in a table are always allocated; a failure here would be a bug in this type.
                let _ = self.pool.release(id);
            }
        }
        self.lens.iter_mut().for_each(|l| *l = 0);
    }

    /// Keep only the first `len` tokens of every layer (pages past it go back to the pool).
    pub fn truncate(&mut self, len: usize) {
        let keep_pages = self.geom.pages_for(len);
        for (table, l) in self.tables.iter_mut().zip(self.lens.iter_mut()) {
            for id in table.drain(keep_pages.min(table.len())..) {
                let _ = self.pool.release(id);
            }
            *l = (*l).min(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_and_read_back() {
        let g = PageGeometry::new(2, 2, 3).unwrap();
        let mut c = PagedKvCache::new(g, 2, None).unwrap();
        for pos in 0..5 {
            let k: Vec<f32> = (0..6).map(|i| (pos * 100 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            c.append(1, &k, &v).unwrap();
        }
        assert_eq!(c.len(1), 5);
        assert_eq!(c.len(0), 0);
        assert_eq!(c.num_pages(1), 3);
        assert_eq!(c.page_len(1, 2), 1);
        // token 3 is page 1 row 1; head 1 dims are k[3..6]
        let k = c.keys(1, 1, 1).unwrap();
        assert_eq!(&k[3..6], &[303.0, 304.0, 305.0]);
        let v = c.values(1, 1, 1).unwrap();
        assert_eq!(&v[3..6], &[-303.0, -304.0, -305.0]);
        assert!(c.keys(1, 3, 0).is_err());
        assert!(c.append(2, &[0.0; 6], &[0.0; 6]).is_err());
        assert!(c.append(0, &[0.0; 5], &[0.0; 6]).is_err());
        c.truncate(2);
        assert_eq!(c.len(1), 2);
        assert_eq!(c.num_pages(1), 1);
        c.clear();
        assert!(c.is_empty());
        assert_eq!(c.pool().pages_in_use(), 0);
    }

    #[test]
    fn bounded_pool_errors_without_losing_data() {
        let g = PageGeometry::new(1, 1, 1).unwrap();
        let mut c = PagedKvCache::new(g, 1, Some(2)).unwrap();
        c.append(0, &[1.0], &[2.0]).unwrap();
        c.append(0, &[3.0], &[4.0]).unwrap();
        assert!(matches!(
            c.append(0, &[5.0], &[6.0]),
            Err(LayoutError::PoolExhausted { .. })
        ));
        assert_eq!(c.len(0), 2);
        assert_eq!(c.keys(0, 1, 0).unwrap(), &[3.0]);
    }
}
