use crate::{LayoutError, PageGeometry};

/// Identifier of a page inside a [`HostPagePool`].
pub type PageId = u32;

/// Pages per growth step of the host pool: memory is reserved in chunks, not per page.
const GROW_CHUNK_PAGES: usize = 64;

/// A growable pool of host pages in HND layout (`[kv_heads][2][page_size][head_dim]` each).
///
/// Pages are handed out from a free list first, then by growing the backing storage in chunks of
/// 64 pages. `max_pages` bounds the growth: beyond it `alloc` returns
/// [`LayoutError::PoolExhausted`] and nothing already stored is touched.
#[derive(Debug)]
pub struct HostPagePool<T> {
    geom: PageGeometry,
    data: Vec<T>,
    allocated: Vec<bool>,
    free: Vec<PageId>,
    max_pages: Option<usize>,
}

impl<T: Copy + Default> HostPagePool<T> {
    /// An empty pool; `max_pages = None` means "grow while memory lasts".
    pub fn new(geom: PageGeometry, max_pages: Option<usize>) -> Self {
        Self {
            geom,
            data: Vec::new(),
            allocated: Vec::new(),
            free: Vec::new(),
            max_pages,
        }
    }

    /// The page geometry of every page in this pool.
    pub fn geometry(&self) -> PageGeometry {
        self.geom
    }

    /// Pages currently handed out.
    pub fn pages_in_use(&self) -> usize {
        self.allocated.len() - self.free.len()
    }

    /// Pages backed by storage (in use or free).
    pub fn capacity_pages(&self) -> usize {
        self.allocated.len()
    }

    /// Bytes of backing storage.
    pub fn bytes_reserved(&self) -> usize {
        self.data.len() * std::mem::size_of::<T>()
    }

    /// Hand out one page (contents unspecified: previous data or zeros).
    pub fn alloc(&mut self) -> Result<PageId, LayoutError> {
        if let Some(id) = self.free.pop() {
            self.allocated[id as usize] = true;
            return Ok(id);
        }
        let n = self.allocated.len();
        let limit = self
            .max_pages
            .unwrap_or(u32::MAX as usize)
            .min(u32::MAX as usize);
        if n >= limit {
            return Err(LayoutError::PoolExhausted {
                max_pages: limit,
                page_bytes: self.geom.page_elems() * std::mem::size_of::<T>(),
            });
        }
        let grow = GROW_CHUNK_PAGES.min(limit - n);
        let new_len = (n + grow) * self.geom.page_elems();
        self.data
            .try_reserve_exact(new_len - self.data.len())
            .map_err(|_| LayoutError::PoolExhausted {
                max_pages: n,
                page_bytes: self.geom.page_elems() * std::mem::size_of::<T>(),
            })?;
        self.data.resize(new_len, T::default());
        self.allocated.resize(n + grow, false);
        // Hand out the lowest new id first, keep the rest on the free list (highest at the bottom).
        for id in ((n + 1)..(n + grow)).rev() {
            self.free.push(id as PageId);
        }
        self.allocated[n] = true;
        Ok(n as PageId)
    }

    /// Return a page to the pool.
    pub fn release(&mut self, id: PageId) -> Result<(), LayoutError> {
        match self.allocated.get_mut(id as usize) {
            Some(a) if *a => {
                *a = false;
                self.free.push(id);
                Ok(())
            }
            _ => Err(LayoutError::BadPage(id)),
        }
    }

    fn range(&self, id: PageId) -> Result<std::ops::Range<usize>, LayoutError> {
        if !self.allocated.get(id as usize).copied().unwrap_or(false) {
            return Err(LayoutError::BadPage(id));
        }
        let e = self.geom.page_elems();
        Ok(id as usize * e..(id as usize + 1) * e)
    }

    /// The whole page (HND).
    pub fn page(&self, id: PageId) -> Result<&[T], LayoutError> {
        let r = self.range(id)?;
        Ok(&self.data[r])
    }

    /// The whole page (HND), mutable.
    pub fn page_mut(&mut self, id: PageId) -> Result<&mut [T], LayoutError> {
        let r = self.range(id)?;
        Ok(&mut self.data[r])
    }

    /// One (page, KV head) unit: the K block then the V block, `2 * P * d` contiguous elements.
    pub fn head_unit(&self, id: PageId, head: usize) -> Result<&[T], LayoutError> {
        if head >= self.geom.kv_heads {
            return Err(LayoutError::OutOfRange {
                what: "kv head",
                index: head,
                limit: self.geom.kv_heads,
            });
        }
        let u = self.geom.head_unit_elems();
        let page = self.page(id)?;
        Ok(&page[head * u..(head + 1) * u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_reuse_and_bound() {
        let g = PageGeometry::new(2, 1, 2).unwrap();
        let mut p = HostPagePool::<f32>::new(g, Some(3));
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        let c = p.alloc().unwrap();
        assert_eq!((a, b, c), (0, 1, 2));
        assert!(matches!(p.alloc(), Err(LayoutError::PoolExhausted { .. })));
        p.page_mut(b).unwrap()[0] = 7.0;
        p.release(b).unwrap();
        assert_eq!(p.release(b), Err(LayoutError::BadPage(b)));
        assert!(p.page(b).is_err());
        assert_eq!(p.alloc().unwrap(), b);
        assert_eq!(p.pages_in_use(), 3);
        assert_eq!(p.page(a).unwrap()[0], 0.0);
    }

    #[test]
    fn head_unit_is_contiguous_hnd() {
        let g = PageGeometry::new(2, 3, 2).unwrap();
        let mut p = HostPagePool::<u32>::new(g, None);
        let id = p.alloc().unwrap();
        for (i, x) in p.page_mut(id).unwrap().iter_mut().enumerate() {
            *x = i as u32;
        }
        let u = p.head_unit(id, 1).unwrap();
        assert_eq!(u[0] as usize, g.hnd_index(1, 0, 0, 0));
        assert_eq!(u[u.len() - 1] as usize, g.hnd_index(1, 1, 1, 1));
        assert!(p.head_unit(id, 3).is_err());
    }
}
