//! Device weights: bf16 copies of the model's matrices, Q/K/V and gate/up fused into one matrix
//! each, uploaded once.

use std::sync::Arc;

use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::init::InitKernels;
use freekv_kernels::{Gpu, KernelError};

use crate::ModelError;
use crate::config::LlamaConfig;
use crate::gguf::GgufFile;
use crate::quant;

use super::synthetic::{PERSISTENT_DIMS, PERSISTENT_EMBD_STD};

/// The weights of one transformer block on the device.
pub(crate) struct LayerWeights {
    pub attn_norm: CudaSlice<bf16>,
    pub ffn_norm: CudaSlice<bf16>,
    /// `[q_dim + 2·kv_dim, hidden]`: rows of Wq, then Wk, then Wv.
    pub wqkv: CudaSlice<bf16>,
    /// `[hidden, q_dim]`.
    pub wo: CudaSlice<bf16>,
    /// `[2·ffn, hidden]`: rows of Wgate, then Wup.
    pub w_gate_up: CudaSlice<bf16>,
    /// `[hidden, ffn]`.
    pub w_down: CudaSlice<bf16>,
}

/// Every weight of the model on the device.
pub(crate) struct Weights {
    /// `[vocab, hidden]`.
    pub embd: CudaSlice<bf16>,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub head: Option<CudaSlice<bf16>>,
    pub output_norm: CudaSlice<bf16>,
    pub layers: Vec<LayerWeights>,
    /// Llama 3 RoPE frequency divisors (`head_dim / 2`).
    pub freq_factors: Option<CudaSlice<f32>>,
}

impl Weights {
    /// The output head matrix.
    pub fn head(&self) -> &CudaSlice<bf16> {
        self.head.as_ref().unwrap_or(&self.embd)
    }

    /// Bytes of device memory the weights take.
    pub fn bytes(&self) -> usize {
        let mut n = self.embd.len() + self.output_norm.len();
        if let Some(h) = &self.head {
            n += h.len();
        }
        for l in &self.layers {
            n += l.attn_norm.len()
                + l.ffn_norm.len()
                + l.wqkv.len()
                + l.wo.len()
                + l.w_gate_up.len()
                + l.w_down.len();
        }
        2 * n
    }
}

fn drv(what: &str) -> impl FnOnce(freekv_kernels::cudarc::driver::DriverError) -> ModelError {
    let what = what.to_string();
    move |source| ModelError::Kernel(KernelError::Driver { what, source })
}

fn alloc(stream: &Arc<CudaStream>, n: usize, what: &str) -> Result<CudaSlice<bf16>, ModelError> {
    // SAFETY: every element is written (by an upload or the init kernel) before it is read.
    unsafe { stream.alloc::<bf16>(n) }.map_err(|e| {
        ModelError::Kernel(KernelError::Driver {
            what: format!(
                "allocating {what} ({:.1} MiB of device memory)",
                (2 * n) as f64 / (1 << 20) as f64
            ),
            source: e,
        })
    })
}

/// Dequantizes tensor `name` (expected `rows × cols`) to bf16 and appends it to `out`.
fn push_matrix(
    g: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    out: &mut Vec<bf16>,
    scratch: &mut Vec<f32>,
) -> Result<(), ModelError> {
    let t = g
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    let want: &[u64] = if rows == 1 {
        &[cols as u64]
    } else {
        &[cols as u64, rows as u64]
    };
    if t.dims.as_slice() != want {
        return Err(ModelError::Shape(format!(
            "tensor `{name}` has dims {:?}, expected {want:?}",
            t.dims
        )));
    }
    scratch.clear();
    scratch.resize(rows * cols, 0.0);
    quant::dequantize(t.ty, g.tensor_data(t)?, scratch)?;
    out.extend(scratch.iter().map(|&x| bf16::from_f32(x)));
    Ok(())
}

impl Weights {
    /// Dequantizes every matrix of `g` on the host (to f32, then bf16) and uploads it.
    pub fn from_gguf(gpu: &Gpu, g: &GgufFile, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let _span = tracing::debug_span!("cuda_upload_weights").entered();
        let s = gpu.stream();
        let (h, qd, kvd, ff) = dims(cfg);
        let mut scratch = Vec::new();
        let mut upload = |parts: &[(&str, usize, usize)]| -> Result<CudaSlice<bf16>, ModelError> {
            let n: usize = parts.iter().map(|p| p.1 * p.2).sum();
            let mut host = Vec::with_capacity(n);
            for &(name, rows, cols) in parts {
                push_matrix(g, name, rows, cols, &mut host, &mut scratch)?;
            }
            let mut d = alloc(s, n, parts.first().map_or("weights", |p| p.0))?;
            s.memcpy_htod(&host, &mut d)
                .map_err(drv("uploading weights"))?;
            Ok(d)
        };
        let embd = upload(&[("token_embd.weight", cfg.vocab_size, h)])?;
        let head = if g.tensor("output.weight").is_some() {
            Some(upload(&[("output.weight", cfg.vocab_size, h)])?)
        } else {
            None
        };
        let output_norm = upload(&[("output_norm.weight", 1, h)])?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: upload(&[(&n("attn_norm"), 1, h)])?,
                ffn_norm: upload(&[(&n("ffn_norm"), 1, h)])?,
                wqkv: upload(&[
                    (&n("attn_q"), qd, h),
                    (&n("attn_k"), kvd, h),
                    (&n("attn_v"), kvd, h),
                ])?,
                wo: upload(&[(&n("attn_output"), h, qd)])?,
                w_gate_up: upload(&[(&n("ffn_gate"), ff, h), (&n("ffn_up"), ff, h)])?,
                w_down: upload(&[(&n("ffn_down"), h, ff)])?,
            });
        }
        let freq_factors = upload_factors(s, cfg)?;
        gpu.synchronize()?;
        Ok(Self {
            embd,
            head,
            output_norm,
            layers,
            freq_factors,
        })
    }

    /// Seeded random weights generated on the device: matrices uniform with standard deviation
    /// 0.02 (as Hugging Face initialises Llama), norm weights 1. With `persistent = Some(v)`
    /// the embedding rows are drawn with standard deviation [`PERSISTENT_EMBD_STD`] and their
    /// first [`PERSISTENT_DIMS`] elements set to `v` (see [`super::SyntheticSpec`]).
    pub fn synthetic(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        seed: u64,
        persistent: Option<f32>,
    ) -> Result<Self, ModelError> {
        let _span = tracing::debug_span!("cuda_synthetic_weights").entered();
        let s = gpu.stream();
        let init = InitKernels::load(gpu)?;
        let (h, qd, kvd, ff) = dims(cfg);
        // Uniform on [-a, a] has standard deviation a / sqrt(3).
        let a = 0.02 * 3f32.sqrt();
        let mut counter = 0u64;
        let mut random = |n: usize, what: &str| -> Result<CudaSlice<bf16>, ModelError> {
            let mut d = alloc(s, n, what)?;
            counter += 1;
            init.uniform_bf16(
                s,
                &mut d,
                seed ^ counter.wrapping_mul(0xA24B_AED4_963E_E407),
                a,
                0.0,
            )?;
            Ok(d)
        };
        let mut embd = random(cfg.vocab_size * h, "token_embd")?;
        if let Some(v) = persistent {
            init.uniform_bf16(
                s,
                &mut embd,
                seed ^ 0xE3B0_C442,
                PERSISTENT_EMBD_STD * 3f32.sqrt(),
                0.0,
            )?;
            init.fill_columns_bf16(s, &mut embd, h, PERSISTENT_DIMS.min(h), v)?;
        }
        let head = if cfg.tied_embeddings {
            None
        } else {
            Some(random(cfg.vocab_size * h, "output")?)
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            layers.push(LayerWeights {
                attn_norm: ones(&init, s, h)?,
                ffn_norm: ones(&init, s, h)?,
                wqkv: random((qd + 2 * kvd) * h, "attn_qkv")?,
                wo: random(h * qd, "attn_output")?,
                w_gate_up: random(2 * ff * h, "ffn_gate_up")?,
                w_down: random(h * ff, "ffn_down")?,
            });
        }
        let output_norm = ones(&init, s, h)?;
        let freq_factors = upload_factors(s, cfg)?;
        gpu.synchronize()?;
        Ok(Self {
            embd,
            head,
            output_norm,
            layers,
            freq_factors,
        })
    }
}

fn ones(init: &InitKernels, s: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<bf16>, ModelError> {
    let mut d = alloc(s, n, "norm")?;
    init.uniform_bf16(s, &mut d, 0, 0.0, 1.0)?;
    Ok(d)
}

fn upload_factors(
    s: &Arc<CudaStream>,
    cfg: &LlamaConfig,
) -> Result<Option<CudaSlice<f32>>, ModelError> {
    match &cfg.rope_freq_factors {
        None => Ok(None),
        Some(f) => {
            if f.len() != cfg.head_dim / 2 {
                return Err(ModelError::Config(format!(
                    "{} RoPE frequency factors for head dim {}",
                    f.len(),
                    cfg.head_dim
                )));
            }
            Ok(Some(
                s.clone_htod(f).map_err(drv("uploading RoPE factors"))?,
            ))
        }
    }
}

/// (hidden, q_dim, kv_dim, ffn).
pub(crate) fn dims(cfg: &LlamaConfig) -> (usize, usize, usize, usize) {
    (
        cfg.hidden,
        cfg.n_heads * cfg.head_dim,
        cfg.n_kv_heads * cfg.head_dim,
        cfg.ffn_hidden,
    )
}
