//! The CUDA decoder against exact bf16 arithmetic (the emulator of tests/common_bf16) and the
//! f32 CPU decoder (tiny random GGUF models generated in the test, the default model and the
//! shared reference outputs when present), batched against per-sequence decode, graph replay
//! against eager decode, chunked against whole prefill, device sampling. Every test prints one
//! "skipped: no CUDA device" line and passes where there is no GPU.
//!
//! Tolerances. The CUDA decoder stores weights, activations, the residual stream and the KV in
//! bf16 (fp32 accumulation); how far that lands from the f32 CPU path is measured by the bf16
//! emulator of tests/common_bf16, which rounds at the same points (tests/cuda_bf16_emulation.rs:
//! rel L2 3.8e-2, max |Δlogit| 0.64 on chat_short, logits ~25). Two exact bf16 implementations
//! that differ only in summation order still differ where a sum lands on the other side of a
//! rounding boundary, and such flips propagate: measured on the H200, the CUDA logits are
//! 1.1e-2 (rel L2) from the emulator on chat_short, about a quarter of the bf16-vs-f32 distance.
//! So on the default model CUDA-vs-emulator ≤ 0.5 × emulator-vs-f32 (+1e-3); on the tiny random
//! models, which amplify rounding differences (measured per step up to 0.64×), the means over
//! prefill and 9 decode steps: CUDA-vs-emulator ≤ emulator-vs-f32 (+1e-3). Everywhere
//! CUDA-vs-f32 ≤ 1.5 × emulator-vs-f32
//! (+1e-3); on both reference prompts rel L2 ≤ 0.08 and max |Δlogit| ≤ 1.5 against the CPU and
//! the HF f32 reference, at least 8 of the reference top 10 in the CUDA top 10, the same argmax
//! where the reference margin exceeds 0.1 at the prompt and 0.25 on the teacher-forced steps
//! (a bf16 rounding moves the top-2 gap by a fraction of the max |Δlogit|), and the free-running
//! greedy text of chat_short equal. Paths that run the same kernels in another arrangement
//! (chunked prefill) must agree to 1e-2 relative L2; a batch against single sequences (different
//! kernels: fused skinny kernels up to 2 rows, cuBLAS above) to 0.1 per step and 3e-2 on
//! average; graph replay must equal eager to 1e-4.

mod common_bf16;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use common_bf16::{Bf16Emulator, max_abs, rel_l2, tiny_configs};
use freekv_kernels::testing::gpu;
use freekv_model::cuda::{BatchOptions, CudaLlama, StepMode};
use freekv_model::generate::GenerateOptions;
use freekv_model::gguf::GgufFile;
use freekv_model::llama::LlamaModel;
use freekv_model::sampling::{SamplingParams, argmax};
use freekv_model::testing::{TinyConfig, default_model_path, read_npy_f32, tiny_random_model};
use freekv_model::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn top_k(l: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..l.len()).collect();
    idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn tiny(seed: u64, cfg: &TinyConfig) -> Arc<GgufFile> {
    Arc::new(tiny_random_model(seed, cfg).unwrap())
}

fn row(l: &[f32], vocab: usize, i: usize) -> &[f32] {
    &l[i * vocab..(i + 1) * vocab]
}

#[test]
fn tiny_models_match_bf16_emulation_and_cpu() {
    let Some(g) = gpu() else { return };
    for (name, cfg) in tiny_configs() {
        let gguf = tiny(11, &cfg);
        let cpu = LlamaModel::new(gguf.clone()).unwrap();
        let cuda = CudaLlama::from_gguf(g.clone(), &gguf).unwrap();
        let vocab = cpu.vocab_size();
        let mut r = StdRng::seed_from_u64(5);
        let prompt: Vec<u32> = (0..45).map(|_| r.random_range(3..vocab as u32)).collect();
        let mut cpu_s = cpu.session(16).unwrap();
        let mut cpu_l = vec![cpu.prefill(&mut cpu_s, &prompt).unwrap().to_vec()];
        let mut b = cuda
            .new_batch(BatchOptions {
                max_seq_len: 128,
                page_size: 16,
                prefill_chunk: 16,
                ..BatchOptions::default()
            })
            .unwrap();
        cuda.prefill(&mut b, 0, &prompt).unwrap();
        // Prefill, then 9 decode steps fed with the CUDA decoder's own greedy choices (the CPU
        // decoder and the emulator are fed the same tokens).
        let mut tokens = prompt.clone();
        let mut got = vec![cuda.logits(&b).unwrap()];
        for _ in 0..9 {
            let t = cuda.argmax(&mut b).unwrap();
            tokens.push(t[0]);
            cuda.decode_step(&mut b, &t).unwrap();
            got.push(cuda.logits(&b).unwrap());
            cpu_l.push(cpu.decode(&mut cpu_s, t[0]).unwrap().to_vec());
        }
        let at: Vec<usize> = (prompt.len() - 1..tokens.len()).collect();
        let emu = Bf16Emulator::new(&gguf).logits(&tokens, &at);
        let (mut ge, mut ec, mut gc) = (0f64, 0f64, 0f64);
        for (step, ((gl, el), cl)) in got.iter().zip(&emu).zip(&cpu_l).enumerate() {
            let (e_ge, e_ec, e_gc) = (rel_l2(gl, el), rel_l2(el, cl), rel_l2(gl, cl));
            println!(
                "tiny {name} step {step}: rel L2 CUDA-emulator {e_ge:.2e}, emulator-f32 {e_ec:.2e}, CUDA-f32 {e_gc:.2e}"
            );
            // Per step, only a gross bound: random tiny models amplify rounding differences.
            assert!(e_ge <= 0.2 && e_gc <= 0.3, "{name} step {step}");
            (ge, ec, gc) = (ge + e_ge, ec + e_ec, gc + e_gc);
        }
        let n = got.len() as f64;
        let (ge, ec, gc) = (ge / n, ec / n, gc / n);
        println!(
            "tiny {name} mean over {n} positions: CUDA-emulator {ge:.2e}, emulator-f32 {ec:.2e}, CUDA-f32 {gc:.2e}"
        );
        assert!(
            ge <= ec + 1e-3,
            "{name}: CUDA {ge} from the bf16 emulator, which is {ec} from f32"
        );
        assert!(
            gc <= 1.5 * ec + 1e-3,
            "{name}: CUDA {gc} from f32, the bf16 emulator {ec}"
        );
    }
}

#[test]
fn batched_ragged_decode_equals_single_sequences() {
    let Some(g) = gpu() else { return };
    let (_, cfg) = tiny_configs().remove(0);
    let gguf = tiny(3, &cfg);
    let cuda = CudaLlama::from_gguf(g, &gguf).unwrap();
    let vocab = cuda.config().vocab_size;
    let mut r = StdRng::seed_from_u64(9);
    let lens = [5usize, 37, 70, 1];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| r.random_range(3..vocab as u32)).collect())
        .collect();
    let steps = 6;
    let feed: Vec<Vec<u32>> = (0..steps)
        .map(|_| {
            (0..lens.len())
                .map(|_| r.random_range(3..vocab as u32))
                .collect()
        })
        .collect();
    let opts = BatchOptions {
        max_seqs: lens.len(),
        max_seq_len: 96,
        page_size: 16,
        prefill_chunk: 32,
        use_graph: true,
    };
    let mut b = cuda.new_batch(opts).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        cuda.prefill(&mut b, i, p).unwrap();
    }
    let mut batched = vec![cuda.logits(&b).unwrap()];
    for f in &feed {
        cuda.decode_step(&mut b, f).unwrap();
        batched.push(cuda.logits(&b).unwrap());
    }
    assert!(b.has_graph(), "graph error: {:?}", b.graph_error());
    // The batch (4 rows) runs cuBLAS and the unfused kernels; a single sequence (1 row) runs the
    // fused skinny kernels (RMSNorm inside the products, residual adds inside the output
    // products: one bf16 rounding of x per add instead of two). Both are exact bf16 paths with
    // different rounding points, so they agree to bf16 rounding as amplified by the tiny random
    // model (measured on the H200: 1.2e-2 at sequence 0, step 1), not to the 1e-2 of two
    // arrangements of the same kernels.
    let (mut worst, mut sum, mut count) = (0f64, 0f64, 0usize);
    for (i, p) in prompts.iter().enumerate() {
        let mut one = cuda
            .new_batch(BatchOptions {
                max_seqs: 1,
                ..opts
            })
            .unwrap();
        cuda.prefill(&mut one, 0, p).unwrap();
        for (step, f) in std::iter::once(None)
            .chain(feed.iter().map(Some))
            .enumerate()
        {
            if let Some(f) = f {
                cuda.decode_step(&mut one, &[f[i]]).unwrap();
            }
            let single = cuda.logits(&one).unwrap();
            let e = rel_l2(row(&batched[step], vocab, i), &single);
            worst = worst.max(e);
            sum += e;
            count += 1;
            assert!(e <= 0.1, "sequence {i} step {step}: rel L2 {e}");
        }
    }
    let mean = sum / count as f64;
    println!(
        "ragged batch of {lens:?} vs single sequences: worst rel L2 = {worst:.2e}, mean {mean:.2e}"
    );
    assert!(mean <= 3e-2, "mean rel L2 {mean}");
}

#[test]
fn graph_replay_equals_eager() {
    let Some(g) = gpu() else { return };
    let (_, cfg) = tiny_configs().remove(1);
    let gguf = tiny(4, &cfg);
    let cuda = CudaLlama::from_gguf(g, &gguf).unwrap();
    let vocab = cuda.config().vocab_size as u32;
    let mut r = StdRng::seed_from_u64(2);
    let prompts: Vec<Vec<u32>> = [20usize, 50]
        .iter()
        .map(|&n| (0..n).map(|_| r.random_range(3..vocab)).collect())
        .collect();
    let feed: Vec<Vec<u32>> = (0..6)
        .map(|_| (0..2).map(|_| r.random_range(3..vocab)).collect())
        .collect();
    let run = |use_graph: bool| {
        let mut b = cuda
            .new_batch(BatchOptions {
                max_seqs: 2,
                max_seq_len: 80,
                use_graph,
                ..BatchOptions::default()
            })
            .unwrap();
        for (i, p) in prompts.iter().enumerate() {
            cuda.prefill(&mut b, i, p).unwrap();
        }
        let mut modes = Vec::new();
        let mut out = Vec::new();
        for f in &feed {
            modes.push(cuda.decode_step(&mut b, f).unwrap());
            out.push(cuda.logits(&b).unwrap());
        }
        (modes, out, b.graph_error().map(str::to_string))
    };
    let (eager_modes, eager, _) = run(false);
    let (graph_modes, graph, err) = run(true);
    assert!(eager_modes.iter().all(|&m| m == StepMode::Eager));
    assert_eq!(err, None, "graph capture failed");
    assert_eq!(
        graph_modes,
        [
            StepMode::Eager,
            StepMode::Captured,
            StepMode::Replayed,
            StepMode::Replayed,
            StepMode::Replayed,
            StepMode::Replayed
        ]
    );
    let mut worst = 0f32;
    for (step, (a, b)) in graph.iter().zip(&eager).enumerate() {
        let e = rel_l2(a, b);
        worst = worst.max(max_abs(a, b));
        assert!(e <= 1e-4, "step {step}: graph vs eager rel L2 {e}");
    }
    println!("graph replay vs eager: max |Δlogit| = {worst:e}");
}

#[test]
fn chunked_prefill_equals_single_chunk() {
    let Some(g) = gpu() else { return };
    let (_, cfg) = tiny_configs().remove(0);
    let gguf = tiny(8, &cfg);
    let cuda = CudaLlama::from_gguf(g, &gguf).unwrap();
    let vocab = cuda.config().vocab_size as u32;
    let mut r = StdRng::seed_from_u64(1);
    let prompt: Vec<u32> = (0..200).map(|_| r.random_range(3..vocab)).collect();
    let logits = |chunk: usize, page_size: usize| {
        let mut b = cuda
            .new_batch(BatchOptions {
                max_seq_len: 256,
                page_size,
                prefill_chunk: chunk,
                ..BatchOptions::default()
            })
            .unwrap();
        // Two calls, to also cover a prefill that continues a sequence.
        cuda.prefill(&mut b, 0, &prompt[..77]).unwrap();
        cuda.prefill(&mut b, 0, &prompt[77..]).unwrap();
        cuda.logits(&b).unwrap()
    };
    let whole = logits(256, 32);
    for (chunk, ps) in [(16, 16), (64, 32), (100, 8)] {
        let e = rel_l2(&logits(chunk, ps), &whole);
        assert!(e <= 1e-2, "chunk {chunk}, page size {ps}: rel L2 {e}");
    }
}

#[test]
fn device_sampling_edges() {
    let Some(g) = gpu() else { return };
    let (_, cfg) = tiny_configs().remove(0);
    let gguf = tiny(6, &cfg);
    let cuda = CudaLlama::from_gguf(g, &gguf).unwrap();
    let vocab = cuda.config().vocab_size;
    let mut b = cuda
        .new_batch(BatchOptions {
            max_seqs: 2,
            max_seq_len: 32,
            ..BatchOptions::default()
        })
        .unwrap();
    cuda.prefill(&mut b, 0, &[5, 6, 7]).unwrap();
    cuda.prefill(&mut b, 1, &[9, 10]).unwrap();
    let host = cuda.logits(&b).unwrap();
    let am = cuda.argmax(&mut b).unwrap();
    for (i, &t) in am.iter().enumerate() {
        assert_eq!(t as usize, argmax(row(&host, vocab, i)).unwrap());
    }
    let p = SamplingParams {
        temperature: 0.8,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    // u = 0 draws the first token of the order: the most likely one.
    assert_eq!(cuda.sample(&mut b, &p, &[0.0, 0.0]).unwrap(), am);
    let k1 = SamplingParams { top_k: 1, ..p };
    assert_eq!(cuda.sample(&mut b, &k1, &[0.9, 0.5]).unwrap(), am);
    let k5 = SamplingParams { top_k: 5, ..p };
    for u in [0.3f32, 0.99] {
        let ids = cuda.sample(&mut b, &k5, &[u, u]).unwrap();
        for (i, &t) in ids.iter().enumerate() {
            let top = top_k(row(&host, vocab, i), 5);
            assert!(
                top.contains(&(t as usize)),
                "row {i}: {t} not in top-5 {top:?}"
            );
        }
    }
}

#[test]
fn synthetic_shapes_run() {
    let Some(g) = gpu() else { return };
    for name in ["smollm2-135m", "qwen-2.5-7b", "llama-3.1-8b"] {
        let m = CudaLlama::synthetic(g.clone(), name, 1).unwrap();
        assert!(m.source().is_synthetic() && m.source().label().contains("synthetic"));
        let mut b = m
            .new_batch(BatchOptions {
                max_seqs: 2,
                max_seq_len: 160,
                prefill_chunk: 64,
                ..BatchOptions::default()
            })
            .unwrap();
        m.prefill(&mut b, 0, &(1..100).collect::<Vec<u32>>())
            .unwrap();
        m.prefill(&mut b, 1, &[7]).unwrap();
        let mut t = m.argmax(&mut b).unwrap();
        for _ in 0..3 {
            m.decode_step(&mut b, &t).unwrap();
            t = m.argmax(&mut b).unwrap();
        }
        let l = m.logits(&b).unwrap();
        assert!(l.iter().all(|x| x.is_finite()), "{name}: non-finite logits");
        assert!(b.has_graph(), "{name}: {:?}", b.graph_error());
        println!(
            "synthetic {name}: {:.2} GB of bf16 weights, decode OK",
            m.weight_bytes() as f64 / 1e9
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The default model (when cached, or named by FREEKV_MODEL) against the CPU path and the
// independent float32 reference outputs (FREEKV_REFERENCE_DIR, else ../../shared/reference).

fn reference_dir() -> Option<PathBuf> {
    match std::env::var_os("FREEKV_REFERENCE_DIR") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)).filter(|p| p.is_dir()),
        _ => freekv_model::reference_dir!(),
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn default_model_matches_cpu_and_reference() {
    let Some(g) = gpu() else { return };
    let Some(path) = default_model_path() else {
        println!("skipped: default model not cached");
        return;
    };
    let Some(refdir) = reference_dir() else {
        println!("skipped: reference outputs not present");
        return;
    };
    let gguf = Arc::new(GgufFile::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let cpu = LlamaModel::new(gguf.clone()).unwrap();
    let cuda = CudaLlama::from_gguf(g, &gguf).unwrap();
    for name in ["chat_short", "text_1k"] {
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(refdir.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let prompt = ids(&r["prompt_ids"]);
        let hf = read_npy_f32(refdir.join(format!("{name}.last_logits.npy"))).unwrap();
        let mut s = cpu.session(32).unwrap();
        let cpu_l = cpu.prefill(&mut s, &prompt).unwrap().to_vec();
        let mut b = cuda
            .new_batch(BatchOptions {
                max_seq_len: prompt.len() + 64,
                ..BatchOptions::default()
            })
            .unwrap();
        cuda.prefill(&mut b, 0, &prompt).unwrap();
        let gl = cuda.logits(&b).unwrap();
        let top_ref = top_k(&hf, 10);
        let top_gpu = top_k(&gl, 10);
        let agree = top_ref.iter().filter(|i| top_gpu.contains(i)).count();
        let (d_cpu, d_hf) = (max_abs(&gl, &cpu_l), max_abs(&gl, &hf));
        println!(
            "{name}: CUDA vs CPU max |Δlogit| {d_cpu:.4} (rel L2 {:.2e}); vs HF f32 reference {d_hf:.4}; \
             top-10 agreement {agree}/10; argmax CUDA {} CPU {} reference {}",
            rel_l2(&gl, &cpu_l),
            argmax(&gl).unwrap(),
            argmax(&cpu_l).unwrap(),
            argmax(&hf).unwrap()
        );
        let (e_cpu, e_hf) = (rel_l2(&gl, &cpu_l), rel_l2(&gl, &hf));
        assert!(
            d_cpu <= 1.5 && d_hf <= 1.5 && e_cpu <= 0.08 && e_hf <= 0.08,
            "{name}: logits too far from f32"
        );
        if name == "chat_short" {
            let emu = Bf16Emulator::new(&gguf)
                .logits(&prompt, &[prompt.len() - 1])
                .remove(0);
            let (e_emu, e_emu_cpu) = (rel_l2(&gl, &emu), rel_l2(&emu, &cpu_l));
            println!(
                "{name}: CUDA vs bf16 emulator rel L2 {e_emu:.2e}, max |Δlogit| {:.4}; emulator vs f32 CPU rel L2 {e_emu_cpu:.2e}",
                max_abs(&gl, &emu)
            );
            assert!(
                e_emu <= 0.5 * e_emu_cpu + 1e-3,
                "{name}: CUDA {e_emu} from the bf16 emulator, which is {e_emu_cpu} from f32"
            );
            assert!(
                e_cpu <= 1.5 * e_emu_cpu + 1e-3,
                "{name}: CUDA {e_cpu} vs emulator {e_emu_cpu}"
            );
        }
        assert!(agree >= 8, "{name}: top-10 agreement {agree}");
        let margin = r["steps_top5"][0]["margin12"].as_f64().unwrap();
        if margin > 0.1 {
            assert_eq!(argmax(&gl), argmax(&hf), "{name}: argmax (margin {margin})");
        }
        // Greedy continuation, teacher-forced on the reference: the argmax must agree at every
        // step whose reference margin exceeds 0.1.
        let gen_ids = ids(&r["generated_ids"]);
        let steps = r["steps_top5"].as_array().unwrap();
        let (mut checked, mut agreed) = (0, 0);
        let mut logits = gl;
        for (i, st) in steps.iter().enumerate().take(gen_ids.len()) {
            let m = st["margin12"].as_f64().unwrap();
            let top = ids(&st["top_ids"]);
            let got = argmax(&logits).unwrap() as u32;
            if got == top[0] {
                agreed += 1;
            }
            if m > 0.25 {
                assert_eq!(got, top[0], "{name} step {i} (margin {m})");
                checked += 1;
            }
            cuda.decode_step(&mut b, &[gen_ids[i]]).unwrap();
            logits = cuda.logits(&b).unwrap();
        }
        println!(
            "{name}: teacher-forced greedy steps: {agreed}/{} agree with the reference, {checked} with margin > 0.25 checked",
            steps.len().min(gen_ids.len())
        );
    }
    // Free-running greedy generation of chat_short.
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refdir.join("chat_short.json")).unwrap())
            .unwrap();
    let prompt = ids(&r["prompt_ids"]);
    let opts = GenerateOptions {
        max_new_tokens: 32,
        ..GenerateOptions::default()
    };
    let out = cuda
        .generate(
            Some(&tok),
            &prompt,
            &opts,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
    println!(
        "chat_short greedy on CUDA: {:?} ({} tokens, {:.1} tok/s decode)",
        out.text,
        out.generated_ids.len(),
        out.timings.decode_tok_s
    );
    assert_eq!(
        out.text,
        r["generated_text"]
            .as_str()
            .unwrap()
            .trim_end_matches("<|im_end|>")
    );
}

/// The native tensor-core GEMM backend against cuBLAS on a whole model: a synthetic
/// smollm2-135m (hidden 576, FFN 1536, vocabulary 49152: no width a multiple of the 128-column
/// tile but the vocabulary) prefilled in chunks of 64 and decoded for 4 steps as a batch of 10
/// sequences (10 rows: the GEMM backend, not the `gemv` kernels, inside a captured CUDA graph).
/// Both devices handles are built explicitly (`Gpu::with_gemm`), the environment is not read.
/// The two backends sum in different orders, so bf16 activations can round differently and
/// the logits agree to bf16 rounding as propagated through the 30 layers, not bitwise.
#[test]
fn native_gemm_backend_matches_cublas() {
    use freekv_kernels::{GemmBackend, GemmChoice, Gpu};
    if gpu().is_none() {
        return;
    }
    let cublas = Arc::new(Gpu::with_gemm(0, GemmChoice::Cublas).unwrap());
    let native = Arc::new(Gpu::with_gemm(0, GemmChoice::Native).unwrap());
    assert_eq!(cublas.gemm_backend(), GemmBackend::Cublas);
    assert_eq!(native.gemm_backend(), GemmBackend::Native);
    assert!(native.gemm().is_none());
    let lens = [5usize, 90, 17, 64, 1, 33, 70, 2, 100, 9];
    let mut r = StdRng::seed_from_u64(0x6E77);
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| r.random_range(3..49_000u32)).collect())
        .collect();
    let feed: Vec<Vec<u32>> = (0..4)
        .map(|_| lens.iter().map(|_| r.random_range(3..49_000u32)).collect())
        .collect();
    let run = |gpu: Arc<Gpu>| {
        let m = CudaLlama::synthetic(gpu, "smollm2-135m", 21).unwrap();
        let mut b = m
            .new_batch(BatchOptions {
                max_seqs: lens.len(),
                max_seq_len: 128,
                page_size: 16,
                prefill_chunk: 64,
                use_graph: true,
            })
            .unwrap();
        for (i, p) in prompts.iter().enumerate() {
            m.prefill(&mut b, i, p).unwrap();
        }
        let mut out = vec![m.logits(&b).unwrap()];
        for f in &feed {
            m.decode_step(&mut b, f).unwrap();
            out.push(m.logits(&b).unwrap());
        }
        assert!(b.has_graph(), "graph error: {:?}", b.graph_error());
        out
    };
    let want = run(cublas);
    let got = run(native);
    let (mut worst, mut sum, mut dmax) = (0f64, 0f64, 0f32);
    for (step, (a, b)) in got.iter().zip(&want).enumerate() {
        let e = rel_l2(a, b);
        worst = worst.max(e);
        sum += e;
        dmax = dmax.max(max_abs(a, b));
        assert!(
            e <= 2e-2,
            "step {step}: native vs cuBLAS logits rel L2 {e:.3e}"
        );
    }
    let mean = sum / got.len() as f64;
    println!(
        "native vs cuBLAS GEMM, synthetic smollm2-135m, 10 sequences: rel L2 worst {worst:.2e}, \
         mean {mean:.2e}, max |Δlogit| {dmax:.3e}"
    );
    assert!(mean <= 1e-2, "mean rel L2 {mean:.3e}");
}
