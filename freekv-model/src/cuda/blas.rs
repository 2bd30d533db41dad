//! The decoder's linear layers: freekv-kernels' skinny `gemv` kernels for decode-sized products,
//! and a [`Matmul`] (cuBLAS with a fixed workspace, so that the products can be captured in a
//! CUDA graph, or the native tensor-core GEMM: the [`Gpu`]'s backend, `FREEKV_GEMM`) for
//! everything else. With cuBLAS the `gemv` kernels take up to [`GEMV_PREFERRED_MAX_TOKENS`] rows
//! (where they beat cuBLAS); with the native GEMM, whose smallest tile has 64 rows, they take up
//! to [`GEMV_MAX_TOKENS`].
//!
//! Set `FREEKV_GEMV=0` to send every product to the GEMM backend (for before/after
//! measurements), or `FREEKV_GEMV=N` (1 to [`GEMV_MAX_TOKENS`]) to send the decode steps of up
//! to `N` rows to the `gemv` kernels (and their fused operations) whatever the backend.

use std::sync::Arc;

use freekv_kernels::Gpu;
use freekv_kernels::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use freekv_kernels::gemm::{GemmBackend, LinearDims, Matmul};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::gemv::{
    GEMV_MAX_TOKENS, GEMV_PREFERRED_MAX_TOKENS, GemvKernels, GemvOut, gemv_aligned, gemv_supported,
};

use crate::ModelError;

/// cuBLAS workspace handed to the handle (what cuBLAS recommends for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Environment variable: `0` disables the `gemv` kernels (every product through the GEMM backend).
pub(crate) const GEMV_ENV: &str = "FREEKV_GEMV";

/// The decoder's products: the `gemv` kernels where they apply, else the GEMM backend (cuBLAS
/// with a fixed workspace, since cuBLAS must not allocate during a graph capture, or the native
/// GEMM).
#[derive(Debug)]
pub(crate) struct Blas {
    mm: Matmul,
    /// `None` when disabled through [`GEMV_ENV`].
    gemv: Option<GemvKernels>,
    /// Most token rows of a decode step the `gemv` kernels take, set through [`GEMV_ENV`]
    /// (`None`: the backend's default).
    gemv_tokens: Option<usize>,
}

/// [`GEMV_ENV`]: unset, empty or `1`.. as before (`None`: the default split; `Some(0)`: off;
/// `Some(n)`: up to `n` rows, at most [`GEMV_MAX_TOKENS`]). Anything else is an error naming the
/// variable.
fn parse_gemv_setting(v: Option<&str>) -> Result<Option<usize>, ModelError> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match v.parse::<usize>() {
        Ok(n) if n <= GEMV_MAX_TOKENS => Ok(Some(n)),
        _ => Err(ModelError::Config(format!(
            "{GEMV_ENV}=`{v}`: expected 0 (off) or up to {GEMV_MAX_TOKENS} token rows"
        ))),
    }
}

impl Blas {
    /// The products of `gpu`'s stream with `gpu`'s GEMM backend; `gemv` kernels unless
    /// `FREEKV_GEMV=0`.
    pub(crate) fn new(gpu: &Gpu) -> Result<Self, ModelError> {
        let setting = std::env::var(GEMV_ENV).ok();
        let tokens = parse_gemv_setting(setting.as_deref())?;
        let mut b =
            Self::with_options(gpu.stream().clone(), tokens != Some(0), gpu.gemm_backend())?;
        b.gemv_tokens = tokens.filter(|&n| n > 0);
        Ok(b)
    }

    /// The products of `stream` with the `gemv` kernels on or off and the GEMM `backend`, both
    /// regardless of the environment.
    pub(crate) fn with_options(
        stream: Arc<CudaStream>,
        gemv: bool,
        backend: GemmBackend,
    ) -> Result<Self, ModelError> {
        let gemv = if gemv {
            Some(GemvKernels::for_stream(&stream)?)
        } else {
            tracing::debug!("{GEMV_ENV}=0: every product through the {backend} GEMM");
            None
        };
        Ok(Self {
            mm: Matmul::new(stream, backend.into(), WORKSPACE_BYTES)?,
            gemv,
            gemv_tokens: None,
        })
    }

    /// Sizes the GEMM backend's products for `sms` multiprocessors (0: all of them), leaving the
    /// others to the kernels of other streams.
    pub(crate) fn set_sm_target(&self, sms: usize) -> Result<(), ModelError> {
        let n = u32::try_from(sms)
            .map_err(|_| ModelError::Config(format!("SM target {sms} out of range")))?;
        Ok(self.mm.set_sm_count_target(n)?)
    }

    /// The GEMM backend of the products the `gemv` kernels do not take.
    pub(crate) fn backend(&self) -> GemmBackend {
        self.mm.backend()
    }

    /// Most token rows a plain product sends to the `gemv` kernels (see the module docs).
    fn gemv_max_tokens(&self) -> usize {
        if let Some(n) = self.gemv_tokens {
            return n;
        }
        match self.backend() {
            GemmBackend::Cublas => GEMV_PREFERRED_MAX_TOKENS,
            GemmBackend::Native => GEMV_MAX_TOKENS,
        }
    }

    /// `y[t, o] = Σ_i x[t, i] · w[o, i]` for `tokens` rows (row-major; `w` is `[out, in]`), fp32
    /// accumulation. Buffers may be longer than needed. Up to the `gemv` limit of the backend
    /// (see the module docs) with `in` a multiple of 8 and 16-byte aligned `x` and `w`, rows go
    /// to the `gemv` kernels (one pass over the weights), the rest to the GEMM backend.
    pub(crate) fn linear<O: GemvOut>(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        tokens: usize,
        in_features: usize,
        out_features: usize,
    ) -> Result<(), ModelError> {
        let d = LinearDims {
            tokens,
            in_features,
            out_features,
        };
        if let Some(gv) = &self.gemv
            && self.gemv_fits(x, w, d)
        {
            return Ok(gv.linear(self.mm.stream(), x, w, y, d, false)?);
        }
        Ok(self.mm.linear(x, w, y, d, false)?)
    }

    /// The `gemv` kernels when a decode step of `tokens` rows should use them, fused operations
    /// included (up to [`GEMV_PREFERRED_MAX_TOKENS`] rows; `None` when disabled).
    pub(crate) fn fused_kernels(&self, tokens: usize) -> Option<&GemvKernels> {
        self.gemv.as_ref().filter(|_| {
            (1..=self.gemv_tokens.unwrap_or(GEMV_PREFERRED_MAX_TOKENS)).contains(&tokens)
        })
    }

    /// Whether the `gemv` kernels serve this product (decided on the host: shape and alignment).
    fn gemv_fits(&self, x: &impl DevicePtr<bf16>, w: &impl DevicePtr<bf16>, d: LinearDims) -> bool {
        if d.tokens > self.gemv_max_tokens() || !gemv_supported(d) {
            return false;
        }
        let s = self.mm.stream();
        let (xp, _gx) = x.device_ptr(s);
        let (wp, _gw) = w.device_ptr(s);
        gemv_aligned(xp) && gemv_aligned(wp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freekv_kernels::cudarc::driver::CudaSlice;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn gemv_setting() {
        assert_eq!(parse_gemv_setting(None).unwrap(), None);
        assert_eq!(parse_gemv_setting(Some(" ")).unwrap(), None);
        assert_eq!(parse_gemv_setting(Some("0")).unwrap(), Some(0));
        assert_eq!(parse_gemv_setting(Some("4")).unwrap(), Some(4));
        for bad in ["9", "on", "-1"] {
            let e = parse_gemv_setting(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(GEMV_ENV) && e.contains(bad), "{e}");
        }
    }

    fn rand_bf16(r: &mut StdRng, n: usize, a: f32) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(r.random_range(-a..a)))
            .collect()
    }

    /// Max |got − want| / max |want|, failing on any non-finite output.
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
        let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        assert!(scale > 0.0);
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
            / scale
    }

    /// Every route (gemv for few aligned rows — ≤ 2 with cuBLAS, ≤ 8 with the native GEMM —, the
    /// GEMM backend otherwise: more rows, `in` not a multiple of 8, a misaligned `x`) of both
    /// backends against an f64 reference, bf16 and f32 outputs poisoned with NaN.
    #[test]
    fn linear_routes_match_reference() {
        let Some(g) = freekv_kernels::testing::gpu() else {
            return;
        };
        let s = g.stream();
        for backend in [GemmBackend::Cublas, GemmBackend::Native] {
            let blas = Blas::with_options(s.clone(), true, backend).unwrap();
            assert_eq!(blas.backend(), backend);
            linear_routes(&blas, s);
        }
    }

    fn linear_routes(blas: &Blas, s: &Arc<CudaStream>) {
        let mut r = StdRng::seed_from_u64(0xB1A5);
        // (tokens, in, out, x offset in elements)
        for &(t, k, n, off) in &[
            (1usize, 4096usize, 1000usize, 0usize),
            (2, 576, 333, 0),
            (4, 576, 333, 0),
            (8, 1024, 515, 0),
            (9, 1024, 515, 0),
            (3, 100, 70, 0),
            (2, 512, 256, 1),
            (70, 576, 1536, 0),
            (130, 100, 70, 3),
        ] {
            let x = rand_bf16(&mut r, off + t * k, 1.0);
            let w = rand_bf16(&mut r, n * k, 0.1);
            let mut want = vec![0.0f64; t * n];
            for a in 0..t {
                for b in 0..n {
                    want[a * n + b] = (0..k)
                        .map(|i| x[off + a * k + i].to_f64() * w[b * k + i].to_f64())
                        .sum();
                }
            }
            let dx: CudaSlice<bf16> = s.clone_htod(&x).unwrap();
            let dxv = dx.slice(off..);
            let dw = s.clone_htod(&w).unwrap();
            let mut y = s.clone_htod(&vec![bf16::from_bits(0x7fc1); t * n]).unwrap();
            blas.linear(&dxv, &dw, &mut y, t, k, n).unwrap();
            let yb: Vec<f32> = s
                .clone_dtoh(&y)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let e1 = rel_err(&yb, &want);
            let mut y32 = s.clone_htod(&vec![f32::NAN; t * n]).unwrap();
            blas.linear(&dxv, &dw, &mut y32, t, k, n).unwrap();
            let e2 = rel_err(&s.clone_dtoh(&y32).unwrap(), &want);
            assert!(
                e1 <= 1e-2 && e2 <= 1e-4,
                "{:?} {t}x{k}x{n}+{off}: {e1:.2e} {e2:.2e}",
                blas.backend()
            );
        }
    }
}
