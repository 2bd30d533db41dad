use crate::LayoutError;

/// The shape of one KV page: tokens per page, KV heads, head dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageGeometry {
    /// Tokens per page (`P`).
    pub page_size: usize,
    /// KV heads (`Hkv`).
    pub kv_heads: usize,
    /// Head dimension (`d`).
    pub head_dim: usize,
}

impl PageGeometry {
    /// Checked constructor: every dimension must be non-zero and the page must be addressable.
    pub fn new(page_size: usize, kv_heads: usize, head_dim: usize) -> Result<Self, LayoutError> {
        if page_size == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(LayoutError::InvalidGeometry(format!(
                "page_size={page_size}, kv_heads={kv_heads}, head_dim={head_dim}: all must be > 0"
            )));
        }
        let elems = 2usize
            .checked_mul(page_size)
            .and_then(|x| x.checked_mul(kv_heads))
            .and_then(|x| x.checked_mul(head_dim))
            .filter(|&e| e <= (1usize << 40))
            .ok_or_else(|| LayoutError::InvalidGeometry("page too large".into()))?;
        let _ = elems;
        Ok(Self {
            page_size,
            kv_heads,
            head_dim,
        })
    }

    /// Elements of one whole page (K and V, all heads).
    pub fn page_elems(&self) -> usize {
        2 * self.page_size * self.kv_heads * self.head_dim
    }

    /// Elements of one (page, KV head) unit: K block then V block, `2 * P * d`.
    pub fn head_unit_elems(&self) -> usize {
        2 * self.page_size * self.head_dim
    }

    /// Elements of one K (or V) block of one head in HND: `P * d`.
    pub fn head_block_elems(&self) -> usize {
        self.page_size * self.head_dim
    }

    /// Number of pages needed for `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// HND offset of element (`head`, `kv` (0 = K, 1 = V), `token`, `dim`) within a page.
    #[inline]
    pub fn hnd_index(&self, head: usize, kv: usize, token: usize, dim: usize) -> usize {
        ((head * 2 + kv) * self.page_size + token) * self.head_dim + dim
    }

    /// NHD offset of element (`kv`, `token`, `head`, `dim`) within a page.
    #[inline]
    pub fn nhd_index(&self, kv: usize, token: usize, head: usize, dim: usize) -> usize {
        ((kv * self.page_size + token) * self.kv_heads + head) * self.head_dim + dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_zero_dims() {
        assert!(PageGeometry::new(0, 1, 1).is_err());
        assert!(PageGeometry::new(1, 0, 1).is_err());
        assert!(PageGeometry::new(1, 1, 0).is_err());
        assert!(PageGeometry::new(usize::MAX, 2, 2).is_err());
    }

    #[test]
    fn indices_cover_page_once() {
        let g = PageGeometry::new(3, 2, 4).unwrap();
        let mut seen_h = vec![false; g.page_elems()];
        let mut seen_n = vec![false; g.page_elems()];
        for h in 0..2 {
            for kv in 0..2 {
                for t in 0..3 {
                    for d in 0..4 {
                        let a = g.hnd_index(h, kv, t, d);
                        let b = g.nhd_index(kv, t, h, d);
                        assert!(!seen_h[a] && !seen_n[b]);
                        seen_h[a] = true;
                        seen_n[b] = true;
                    }
                }
            }
        }
        assert!(seen_h.iter().all(|&x| x) && seen_n.iter().all(|&x| x));
    }
}
