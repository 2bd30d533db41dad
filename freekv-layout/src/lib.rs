//! Page geometry, NHD/HND page layouts, resident page tables and host page pools for FreeKV.
//!
//! A KV *page* holds `page_size` consecutive tokens of one layer, for every KV head, keys and
//! values. Two layouts of the same page exist:
//!
//! * **NHD** (device): `[2][page_size][kv_heads][head_dim]` — what attention and append kernels read.
//! * **HND** (host): `[kv_heads][2][page_size][head_dim]` — one (page, KV head) unit is contiguous,
//!   so a recall of one head's page is one large copy.
//!
//! What lives here:
//!
//! * [`PageGeometry`], [`PageLayout`] and the CPU transposes ([`nhd_to_hnd`], [`hnd_to_nhd`],
//!   [`hnd_unit_to_nhd_slice`], [`nhd_slice_to_hnd_unit`]) — the reference the GPU kernels are
//!   tested against, generic over the element type (f32, `half::bf16`);
//! * [`HostPagePool`] (growable, bounded, HND) and [`PagedKvCache`] (the CPU decoder's full
//!   history: logical page → host page per layer);
//! * [`Budget`] (sink / retrieved / window pages per layer), [`SlotTable`] (slot ↔ logical page per
//!   (sequence, layer, KV head)), [`LayerResidency`] (all heads of one layer) and
//!   [`SlotDiff`] (kept / to-recall / victims of a selection);
//! * [`MiddleCache`], one head's middle slots with spare slots beyond the top-k (lazy,
//!   lowest-scored-first eviction): the reference of the GPU path's spare slots;
//! * [`SlotPool`], the NHD resident buffer of the CPU backend.
//!
//! This crate never touches CUDA and never moves KV bytes between host and device (that is
//! `freekv-recall`'s job); it holds the index math, the tables and the buffers.
//!
//! ```
//! use freekv_layout::{Budget, LayerResidency, PageGeometry, PagedKvCache};
//! let geom = PageGeometry::new(4, 2, 8).unwrap(); // 4 tokens per page, 2 KV heads, head dim 8
//! let mut cache = PagedKvCache::new(geom, 1, None).unwrap(); // one layer, unbounded pool
//! let k = vec![1.0f32; 2 * 8];
//! let v = vec![2.0f32; 2 * 8];
//! for _ in 0..5 { cache.append(0, &k, &v).unwrap(); }
//! assert_eq!(cache.len(0), 5);
//! assert_eq!(cache.num_pages(0), 2);
//! assert_eq!(cache.keys(0, 1, 1).unwrap().len(), 4 * 8);
//!
//! // 24 resident tokens: 1 sink page + 3 retrieved + 2 window pages of 4 tokens.
//! let budget = Budget::from_tokens(24, 4, 8, 4).unwrap();
//! let mut res = LayerResidency::new(budget, 2).unwrap();
//! res.append_tokens(40).unwrap();                  // 10 full pages: sparse
//! let diff = res.head_mut(1).unwrap().select(&[1, 5, 7]).unwrap();
//! assert_eq!(diff.recalls.len(), 2);               // 5 and 7 were not resident
//! res.check_consistency().unwrap();
//! ```

mod budget;
mod error;
mod geometry;
mod kv_cache;
mod layout;
mod middle_cache;
mod pool;
mod slot_pool;
mod slots;

pub use budget::Budget;
pub use error::LayoutError;
pub use geometry::PageGeometry;
pub use kv_cache::PagedKvCache;
pub use layout::{
    PageLayout, hnd_to_nhd, hnd_unit_to_nhd_slice, nhd_slice_to_hnd_unit, nhd_to_hnd,
};
pub use middle_cache::{CacheDiff, MiddleCache};
pub use pool::{HostPagePool, PageId};
pub use slot_pool::SlotPool;
pub use slots::{LayerResidency, NO_ENTRY, SlotDiff, SlotPage, SlotTable};
