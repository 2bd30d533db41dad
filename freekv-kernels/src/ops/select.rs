//! FreeKV selection launchers (correction flags, fused selection) and the geometry shared by the
//! GPU FreeKV kernels ([`FreeKvShape`]).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};

use crate::KernelError;
use crate::kernels::func;

/// Columns of one row of the per-step `seq_info` table (`i32 [bs][4]`): N, mode, fill slot,
/// fill page.
pub const SEQ_INFO_WIDTH: usize = 4;

/// Geometry of one sparse layer of GPU FreeKV (all counts; see the GPU FreeKV contract).
///
/// Slots of a (sequence, layer): `0..ns` sinks, `ns..ns+k` middle (retrieved) pages,
/// `ns+k..nb` the recent-window ring, `nb = ns + k + nw` ([`FreeKvShape::slots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FreeKvShape {
    /// Sequences in the batch (`bs`).
    pub seqs: usize,
    /// KV heads (`Hkv`).
    pub kv_heads: usize,
    /// Query heads per KV head (`G = Hq / Hkv`).
    pub group: usize,
    /// Head dimension (`d`).
    pub head_dim: usize,
    /// Tokens per page (`P`).
    pub page_size: usize,
    /// Sink pages (`ns`, may be 0).
    pub sink_pages: usize,
    /// Retrieved (middle) pages (`k`, ≥ 1).
    pub top_k: usize,
    /// Recent-window pages, partial page included (`nw`, ≥ 1).
    pub window_pages: usize,
    /// Largest number of logical pages of one sequence (`MP`).
    pub max_pages: usize,
}

/// Largest supported head dimension.
pub const FREEKV_MAX_HEAD_DIM: usize = 256;

impl FreeKvShape {
    /// The shape of a layer with `budget`'s sink / retrieved / window pages and page size.
    pub fn from_budget(
        seqs: usize,
        kv_heads: usize,
        group: usize,
        head_dim: usize,
        budget: &freekv_layout::Budget,
        max_pages: usize,
    ) -> Self {
        Self {
            seqs,
            kv_heads,
            group,
            head_dim,
            page_size: budget.page_size(),
            sink_pages: budget.sink_pages(),
            top_k: budget.retrieved_pages(),
            window_pages: budget.window_pages(),
            max_pages,
        }
    }

    /// Resident slots per (sequence, layer): `nb = ns + k + nw` (saturating; [`Self::validate`]
    /// rejects overflow).
    pub fn slots(&self) -> usize {
        self.sink_pages
            .saturating_add(self.top_k)
            .saturating_add(self.window_pages)
    }

    /// Query heads `Hq = Hkv * G` (saturating).
    pub fn q_heads(&self) -> usize {
        self.kv_heads.saturating_mul(self.group)
    }

    /// (sequence, KV head) rows: `bs * Hkv` (saturating).
    pub fn rows(&self) -> usize {
        self.seqs.saturating_mul(self.kv_heads)
    }

    /// Checks the shape: every count non-zero except `sink_pages`, `head_dim` a multiple of 8 and
    /// at most [`FREEKV_MAX_HEAD_DIM`], and every page / slot / row index (`bs * nb` physical
    /// pages, `bs * Hkv * MP` table entries, `bs * Hq * d` query elements) fitting in `i32`.
    /// Errors name `kernel`.
    pub fn validate(&self, kernel: &'static str) -> Result<(), KernelError> {
        let nonzero = [
            ("seqs", self.seqs),
            ("kv_heads", self.kv_heads),
            ("group", self.group),
            ("head_dim", self.head_dim),
            ("page_size", self.page_size),
            ("top_k", self.top_k),
            ("window_pages", self.window_pages),
            ("max_pages", self.max_pages),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(KernelError::arg(
                    kernel,
                    format!("FreeKvShape::{name} must be non-zero"),
                ));
            }
        }
        if self.head_dim % 8 != 0 || self.head_dim > FREEKV_MAX_HEAD_DIM {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "head_dim {} must be a multiple of 8 and at most {FREEKV_MAX_HEAD_DIM}",
                    self.head_dim
                ),
            ));
        }
        let lim = i32::MAX as usize;
        let checks = [
            (
                "slots (ns + k + nw)",
                self.sink_pages
                    .checked_add(self.top_k)
                    .and_then(|x| x.checked_add(self.window_pages)),
            ),
            (
                "physical pages (seqs * slots)",
                self.sink_pages
                    .checked_add(self.top_k)
                    .and_then(|x| x.checked_add(self.window_pages))
                    .and_then(|nb| nb.checked_mul(self.seqs)),
            ),
            (
                "page table entries (seqs * kv_heads * max_pages)",
                self.seqs
                    .checked_mul(self.kv_heads)
                    .and_then(|x| x.checked_mul(self.max_pages)),
            ),
            (
                "query elements (seqs * kv_heads * group * head_dim)",
                self.seqs
                    .checked_mul(self.kv_heads)
                    .and_then(|x| x.checked_mul(self.group))
                    .and_then(|x| x.checked_mul(self.head_dim)),
            ),
            (
                "page elements (2 * page_size * kv_heads * head_dim)",
                self.page_size
                    .checked_mul(self.kv_heads)
                    .and_then(|x| x.checked_mul(self.head_dim))
                    .and_then(|x| x.checked_mul(2)),
            ),
        ];
        for (what, v) in checks {
            match v {
                Some(v) if v <= lim => {}
                _ => {
                    return Err(KernelError::arg(
                        kernel,
                        format!("{what} does not fit in i32 for {self:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Which (sequence, KV head) rows a launcher touches, by the correction flag of the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadFilter {
    /// Every row.
    All,
    /// Only rows whose flag is non-zero (the corrective, synchronous path).
    Flagged,
    /// Only rows whose flag is zero (the speculative path).
    Unflagged,
}

impl HeadFilter {
    /// The kernel argument: 0 = all, 1 = flagged, 2 = unflagged.
    pub fn code(self) -> i32 {
        match self {
            HeadFilter::All => 0,
            HeadFilter::Flagged => 1,
            HeadFilter::Unflagged => 2,
        }
    }
}

/// The functions of the `freekv_select` module.
#[derive(Debug)]
pub struct SelectKernels {
    #[allow(dead_code)]
    placeholder: CudaFunction,
}

impl SelectKernels {
    /// Resolve every function of the loaded module.
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Self, KernelError> {
        Ok(Self {
            placeholder: func(m, "freekv_select_placeholder")?,
        })
    }
}
