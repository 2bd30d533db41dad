//! Page geometry, NHD/HND page layouts, page tables and host page pools for FreeKV.
//!
//! A KV *page* holds `page_size` consecutive tokens of one layer, for every KV head, keys and
//! values. Two layouts of the same page exist:
//!
//! * **NHD** (device): `[2][page_size][kv_heads][head_dim]` — what attention and append kernels read.
//! * **HND** (host): `[kv_heads][2][page_size][head_dim]` — one (page, KV head) unit is contiguous,
//!   so a recall of one head's page is one large copy.
//!
//! This crate never touches CUDA; it holds the index math, the CPU transposes (the reference the
//! GPU kernels are tested against), the growable host page pool and the paged KV cache of the
//! CPU decoder.
//!
//! ```
//! use freekv_layout::{PageGeometry, PagedKvCache};
//! let geom = PageGeometry::new(4, 2, 8).unwrap(); // 4 tokens per page, 2 KV heads, head dim 8
//! let mut cache = PagedKvCache::new(geom, 1, None).unwrap(); // one layer, unbounded pool
//! let k = vec![1.0f32; 2 * 8];
//! let v = vec![2.0f32; 2 * 8];
//! for _ in 0..5 { cache.append(0, &k, &v).unwrap(); }
//! assert_eq!(cache.len(0), 5);
//! assert_eq!(cache.num_pages(0), 2);
//! assert_eq!(cache.keys(0, 1, 1).unwrap().len(), 4 * 8);
//! ```

mod error;
mod geometry;
mod kv_cache;
mod pool;

pub use error::LayoutError;
pub use geometry::PageGeometry;
pub use kv_cache::PagedKvCache;
pub use pool::{HostPagePool, PageId};
