//! The default model against the independent float32 reference outputs in shared/reference
//! (skipped with one line when the model or the reference files are absent).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::AtomicBool;

use freekv_model::generate::{GenerateOptions, Generator, StopReason};
use freekv_model::gguf::GgufFile;
use freekv_model::llama::LlamaModel;
use freekv_model::sampling::argmax;
use freekv_model::testing::{default_model_path, read_npy_f32};
use freekv_model::tokenizer::Tokenizer;
use serde_json::Value;

struct Fixture {
    model: LlamaModel,
    tok: Tokenizer,
    refdir: PathBuf,
}

fn fixture() -> Option<Fixture> {
    let Some(path) = default_model_path() else {
        println!("skipped: default model not cached");
        return None;
    };
    let Some(refdir) = freekv_model::reference_dir!() else {
        println!("skipped: reference outputs not present");
        return None;
    };
    let g = Arc::new(GgufFile::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = LlamaModel::new(g).unwrap();
    Some(Fixture { model, tok, refdir })
}

fn load(dir: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Prompt ids equal; the top-10 logits at the last prompt position within 2e-2; all logits
/// compared (max abs diff printed). Returns the session after the prompt.
fn check_prompt(f: &Fixture, name: &str) -> (freekv_model::llama::Session, Value) {
    let r = load(&f.refdir, name);
    let prompt_ids = ids(&r["prompt_ids"]);
    let text = r["prompt_text"].as_str().unwrap();
    assert_eq!(
        f.tok.encode(text, true).unwrap(),
        prompt_ids,
        "{name}: prompt ids"
    );
    let mut s = f.model.session(32).unwrap();
    let logits = f.model.prefill(&mut s, &prompt_ids).unwrap().to_vec();
    for e in r["last_top10"].as_array().unwrap() {
        let id = e["id"].as_u64().unwrap() as usize;
        let want = e["logit"].as_f64().unwrap();
        let got = logits[id] as f64;
        assert!(
            (got - want).abs() <= 2e-2,
            "{name}: logit of {id}: {got} vs {want}"
        );
    }
    let all = read_npy_f32(f.refdir.join(format!("{name}.last_logits.npy"))).unwrap();
    assert_eq!(all.len(), logits.len());
    let max_diff = all
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "{name}: max |logit - reference| over {} logits = {max_diff:.5}",
        all.len()
    );
    assert!(max_diff <= 2e-3, "{name}: max abs logit diff {max_diff}");
    (s, r)
}

#[test]
fn chat_short_matches_reference() {
    let Some(f) = fixture() else { return };
    let (mut s, r) = check_prompt(&f, "chat_short");
    let want = ids(&r["generated_ids"]);
    // Greedy by hand on the session...
    let mut got = Vec::new();
    let mut logits = s.logits().to_vec();
    loop {
        let t = argmax(&logits).unwrap() as u32;
        got.push(t);
        if f.tok.is_eog(t) || got.len() >= want.len() + 4 {
            break;
        }
        logits = f.model.decode(&mut s, t).unwrap().to_vec();
    }
    assert_eq!(got, want);
    // ...and through the generation API, from the prompt text.
    let prompt = f
        .tok
        .encode(r["prompt_text"].as_str().unwrap(), true)
        .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 64,
        ..GenerateOptions::default()
    };
    let mut streamed = Vec::new();
    let out = Generator::new(&f.model, &f.tok)
        .unwrap()
        .generate(&prompt, &opts, &AtomicBool::new(false), &mut |t| {
            streamed.push(t)
        })
        .unwrap();
    assert_eq!(out.generated_ids, want);
    assert_eq!(out.stop, StopReason::Eog);
    assert_eq!(out.text, "The capital of France is Paris.");
    assert_eq!(streamed, want[..want.len() - 1]);
    // The reported log-probabilities are the reference's log-softmax at the first step.
    let st = &r["steps_top5"][0];
    let lse = st["logsumexp"].as_f64().unwrap();
    for (k, tl) in out.top_logprobs[0].iter().enumerate() {
        assert_eq!(tl.id as u64, st["top_ids"][k].as_u64().unwrap());
        let want_lp = st["top_logits"][k].as_f64().unwrap() - lse;
        assert!(
            (tl.logprob as f64 - want_lp).abs() < 2e-3,
            "{tl:?} vs {want_lp}"
        );
    }
}

#[test]
fn text_1k_matches_reference() {
    let Some(f) = fixture() else { return };
    let (mut s, r) = check_prompt(&f, "text_1k");
    let gen_ids = ids(&r["generated_ids"]);
    let steps = r["steps_top5"].as_array().unwrap();
    let mut logits = s.logits().to_vec();
    let mut checked = 0;
    for (i, st) in steps.iter().enumerate() {
        let margin = st["margin12"].as_f64().unwrap();
        let top = ids(&st["top_ids"]);
        if margin > 0.05 {
            assert_eq!(argmax(&logits).unwrap() as u32, top[0], "text_1k step {i}");
            checked += 1;
        }
        // Teacher-forced on the reference continuation.
        logits = f.model.decode(&mut s, gen_ids[i]).unwrap().to_vec();
    }
    assert!(checked >= 10);
}
