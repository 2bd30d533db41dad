//! Argmax and sampling launchers (f32 logits, one block per row).

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::KernelError;
use crate::kernels::{Kernels, check_len, grid_dim, mul, u32_arg};

const THREADS: u32 = 1024;

/// Per-row sampling controls, each a device array of `rows` values.
///
/// Semantics (exactly what the kernel does): temperature `<= 0` or `top_k == 1` → argmax (lowest
/// index among equal maxima). Otherwise tokens are ordered by (logit desc, index asc); the first
/// `top_k` are kept (`top_k <= 0` or `>= vocab`: all); weights are `exp((x - max) / T)`; with
/// `top_p < 1` the shortest prefix whose weight reaches `top_p` of the kept weight is kept (at
/// least one token); the token drawn is the first whose cumulative weight exceeds `u` times the
/// remaining total (`u` in `[0, 1)`, one per row). Weights are summed in 2^-32 fixed point, so the
/// result is deterministic.
#[derive(Debug)]
pub struct SamplingInputs<'a, T, K, P, U>
where
    T: DevicePtr<f32>,
    K: DevicePtr<i32>,
    P: DevicePtr<f32>,
    U: DevicePtr<f32>,
{
    /// Temperatures.
    pub temperature: &'a T,
    /// Top-k (`<= 0`: disabled).
    pub top_k: &'a K,
    /// Top-p (`>= 1`: disabled).
    pub top_p: &'a P,
    /// One uniform number in `[0, 1)` per row.
    pub uniform: &'a U,
}

fn check_logits(
    kernel: &'static str,
    len: usize,
    rows: usize,
    vocab: usize,
) -> Result<(), KernelError> {
    if vocab == 0 {
        return Err(KernelError::arg(kernel, "vocab must be non-zero"));
    }
    if vocab >= u32::MAX as usize {
        return Err(KernelError::arg(kernel, "vocab too large"));
    }
    check_len(kernel, "logits", len, mul(kernel, "logits", rows, vocab)?)
}

impl Kernels {
    /// `out[r] = argmax(logits[r, :vocab])` (`logits`: `[rows, vocab]` f32; NaN counts as the
    /// lowest value, ties go to the lowest index).
    pub fn argmax(
        &self,
        stream: &CudaStream,
        logits: &impl DevicePtr<f32>,
        rows: usize,
        vocab: usize,
        out: &mut impl DevicePtrMut<i32>,
    ) -> Result<(), KernelError> {
        const K: &str = "argmax_f32";
        let _s = tracing::debug_span!("argmax").entered();
        check_logits(K, logits.len(), rows, vocab)?;
        check_len(K, "out", out.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let grid = grid_dim(K, "rows", rows, i32::MAX as u32)?;
        let vocab_u = u32_arg(K, "vocab", vocab)?;
        let stride = vocab as u64;
        let (lp, _gl) = logits.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.argmax);
        b.arg(&op).arg(&lp).arg(&vocab_u).arg(&stride).arg(&grid);
        // SAFETY: argument types match the kernel; sizes checked above.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }

    /// Samples one token per row of `logits` (`[rows, vocab]` f32) into `out`; see
    /// [`SamplingInputs`] for the exact semantics.
    pub fn sample<T, Kk, P, U>(
        &self,
        stream: &CudaStream,
        logits: &impl DevicePtr<f32>,
        rows: usize,
        vocab: usize,
        inputs: &SamplingInputs<'_, T, Kk, P, U>,
        out: &mut impl DevicePtrMut<i32>,
    ) -> Result<(), KernelError>
    where
        T: DevicePtr<f32>,
        Kk: DevicePtr<i32>,
        P: DevicePtr<f32>,
        U: DevicePtr<f32>,
    {
        const K: &str = "sample_f32";
        let _s = tracing::debug_span!("sample").entered();
        check_logits(K, logits.len(), rows, vocab)?;
        check_len(K, "out", out.len(), rows)?;
        check_len(K, "temperature", inputs.temperature.len(), rows)?;
        check_len(K, "top_k", inputs.top_k.len(), rows)?;
        check_len(K, "top_p", inputs.top_p.len(), rows)?;
        check_len(K, "uniform", inputs.uniform.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let grid = grid_dim(K, "rows", rows, i32::MAX as u32)?;
        let vocab_u = u32_arg(K, "vocab", vocab)?;
        let stride = vocab as u64;
        let (lp, _gl) = logits.device_ptr(stream);
        let (tp, _gt) = inputs.temperature.device_ptr(stream);
        let (kp, _gk) = inputs.top_k.device_ptr(stream);
        let (pp, _gp) = inputs.top_p.device_ptr(stream);
        let (up, _gu) = inputs.uniform.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.sample);
        b.arg(&op)
            .arg(&lp)
            .arg(&vocab_u)
            .arg(&stride)
            .arg(&tp)
            .arg(&kp)
            .arg(&pp)
            .arg(&up)
            .arg(&grid);
        // SAFETY: argument types match the kernel; sizes checked above.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }
}
