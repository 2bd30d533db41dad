//! Seeded random initialisation of bf16 device buffers (synthetic models for speed work).
//!
//! The module is compiled on demand (it is not part of [`crate::Kernels`]): load it once with
//! [`InitKernels::load`] and fill buffers with [`InitKernels::uniform_bf16`] (and set leading
//! columns of a row-major matrix with [`InitKernels::fill_columns_bf16`]).

use cudarc::driver::{CudaFunction, CudaStream, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::compile::{self, KernelModule};
use crate::{Gpu, KernelError};

/// The init module (`kernels/init.cu`).
pub const INIT: KernelModule = KernelModule {
    name: "init",
    source: include_str!("../../kernels/init.cu"),
};

/// The value [`InitKernels::uniform_bf16`] writes at index `i` for `seed`, computed on the host
/// in f32 before the final rounding to bf16 (for tests and for documenting the generator).
pub fn uniform_value(seed: u64, i: u64, scale: f32, offset: f32) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 * (1.0 / 16_777_216.0);
    offset + scale * (2.0 * u - 1.0)
}

/// The compiled init kernel.
#[derive(Debug)]
pub struct InitKernels {
    uniform: CudaFunction,
    fill_columns: CudaFunction,
    sm_count: u32,
}

impl InitKernels {
    /// Compiles (or loads from the process and disk caches) the init module for `gpu`.
    pub fn load(gpu: &Gpu) -> Result<Self, KernelError> {
        let include_dirs = compile::resolve_include_dirs()?;
        let cache_dir = compile::default_cache_dir();
        let info = gpu.info();
        let (cubin, _src) = compile::module_cubin(
            &INIT,
            &info.arch(),
            info.nvrtc_version,
            &include_dirs,
            cache_dir.as_deref(),
        )?;
        let module = gpu
            .ctx()
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.as_ref().clone()))
            .map_err(KernelError::driver("loading module init"))?;
        let uniform = module
            .load_function("init_uniform_bf16")
            .map_err(KernelError::driver("resolving kernel init_uniform_bf16"))?;
        let fill_columns =
            module
                .load_function("init_fill_columns_bf16")
                .map_err(KernelError::driver(
                    "resolving kernel init_fill_columns_bf16",
                ))?;
        Ok(Self {
            uniform,
            fill_columns,
            sm_count: info.sm_count,
        })
    }

    /// Fills all of `out` with `offset + scale · (2u − 1)`, `u` uniform in `[0, 1)` drawn from a
    /// counter-based generator keyed by `(seed, index)` (see [`uniform_value`]).
    pub fn uniform_bf16(
        &self,
        stream: &CudaStream,
        out: &mut impl DevicePtrMut<bf16>,
        seed: u64,
        scale: f32,
        offset: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "init_uniform_bf16";
        let _s = tracing::debug_span!("init_uniform").entered();
        if !(scale.is_finite() && offset.is_finite()) {
            return Err(KernelError::InvalidArgument {
                kernel: K,
                msg: format!("scale {scale} and offset {offset} must be finite"),
            });
        }
        let n = out.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(256).min(8 * self.sm_count.max(1) as u64) as u32;
        let (p, _g) = out.device_ptr_mut(stream);
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.uniform);
        b.arg(&p).arg(&n).arg(&seed).arg(&scale).arg(&offset);
        // SAFETY: argument types match the kernel; the kernel writes exactly `n` elements.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }
}

impl InitKernels {
    /// Sets the first `cols` elements of every row of the row-major `[rows][row_len]` matrix
    /// `out` to `value` (bf16-rounded), leaving the rest as it is.
    pub fn fill_columns_bf16(
        &self,
        stream: &CudaStream,
        out: &mut impl DevicePtrMut<bf16>,
        row_len: usize,
        cols: usize,
        value: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "init_fill_columns_bf16";
        let _s = tracing::debug_span!("init_fill_columns").entered();
        let arg = |msg: String| KernelError::InvalidArgument { kernel: K, msg };
        if !value.is_finite() {
            return Err(arg(format!("value {value} must be finite")));
        }
        if row_len == 0 || cols > row_len || out.len() % row_len != 0 {
            return Err(arg(format!(
                "{} elements are not rows of {row_len} with {cols} columns to fill",
                out.len()
            )));
        }
        let cols32 = u32::try_from(cols).map_err(|_| arg(format!("{cols} columns")))?;
        let rows = (out.len() / row_len) as u64;
        let n = rows * cols as u64;
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(256).min(8 * self.sm_count.max(1) as u64) as u32;
        let row_len64 = row_len as u64;
        let (p, _g) = out.device_ptr_mut(stream);
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.fill_columns);
        b.arg(&p)
            .arg(&rows)
            .arg(&row_len64)
            .arg(&cols32)
            .arg(&value);
        // SAFETY: argument types match the kernel; it writes `rows · cols` elements, each inside
        // a row of `out` (cols ≤ row_len, rows · row_len = out.len()).
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_generator_range_and_spread() {
        let v: Vec<f32> = (0..10_000).map(|i| uniform_value(7, i, 1.0, 0.0)).collect();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert_ne!(uniform_value(7, 0, 1.0, 0.0), uniform_value(8, 0, 1.0, 0.0));
        assert_eq!(uniform_value(3, 5, 0.0, 1.0), 1.0);
    }
}
