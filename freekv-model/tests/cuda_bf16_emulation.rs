//! How far from the f32 CPU decoder exact bf16 arithmetic lands, on the CPU (no GPU needed):
//! (a) the CPU decoder on a copy of the model with every tensor stored as bf16 (the weights the
//! CUDA decoder uploads), (b) the bf16 emulator of tests/common_bf16 (bf16 weights and bf16
//! activations where the CUDA kernels store them). These are the yardsticks for the tolerances
//! of tests/cuda_decoder.rs. Tiny models always; the default model when it is cached.

mod common_bf16;

use std::path::PathBuf;
use std::sync::Arc;

use common_bf16::*;
use freekv_model::gguf::GgufFile;
use freekv_model::llama::LlamaModel;
use freekv_model::testing::{default_model_path, tiny_random_model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn compare(name: &str, g: &Arc<GgufFile>, prompt: &[u32]) -> (f64, f64) {
    let orig = LlamaModel::new(g.clone()).unwrap();
    let rounded = LlamaModel::new(Arc::new(bf16_copy(g))).unwrap();
    let a = orig
        .prefill(&mut orig.session(32).unwrap(), prompt)
        .unwrap()
        .to_vec();
    let b = rounded
        .prefill(&mut rounded.session(32).unwrap(), prompt)
        .unwrap()
        .to_vec();
    let emu = Bf16Emulator::new(g)
        .logits(prompt, &[prompt.len() - 1])
        .remove(0);
    let (ew, mw) = (rel_l2(&b, &a), max_abs(&b, &a));
    let (ee, me) = (rel_l2(&emu, &a), max_abs(&emu, &a));
    println!(
        "{name}: vs the f32 CPU path: bf16 weights only: rel L2 {ew:.2e}, max |Δlogit| {mw:.4}; \
         bf16 emulator: rel L2 {ee:.2e}, max |Δlogit| {me:.4}"
    );
    (ew, ee)
}

#[test]
fn bf16_rounding_effect() {
    for (name, cfg) in tiny_configs() {
        let g = Arc::new(tiny_random_model(11, &cfg).unwrap());
        let vocab = LlamaModel::new(g.clone()).unwrap().vocab_size() as u32;
        let mut r = StdRng::seed_from_u64(5);
        let prompt: Vec<u32> = (0..45).map(|_| r.random_range(3..vocab)).collect();
        let (ew, ee) = compare(name, &g, &prompt);
        // Rounding to 8 significant bits moves the logits, but far less than a wrong model would.
        assert!(
            ew > 0.0 && ew < 0.5 && ee > 0.0 && ee < 0.5,
            "{name}: {ew} {ee}"
        );
    }
    let Some(p) = default_model_path() else {
        println!("skipped: default model not cached");
        return;
    };
    let g = Arc::new(GgufFile::open(p).unwrap());
    let refdir: Option<PathBuf> = freekv_model::reference_dir!();
    let prompt: Vec<u32> = match refdir {
        Some(d) => {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("chat_short.json")).unwrap())
                    .unwrap();
            v["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        }
        None => (1..38).map(|i| (i * 997) % 40000 + 100).collect(),
    };
    compare("default model, chat_short prompt", &g, &prompt);
}
