//! The CPU decoder on tiny random models (runs everywhere): exactness against a naive f64
//! forward pass, prefill vs decode, page-size independence, errors.

use std::sync::Arc;

use freekv_model::llama::LlamaModel;
use freekv_model::testing::{ReferenceLlama, TinyConfig, rel_l2, tiny_random_model};
use freekv_model::{GgmlType, ModelError};

fn tiny(seed: u64, cfg: &TinyConfig) -> (LlamaModel, ReferenceLlama) {
    let g = tiny_random_model(seed, cfg).unwrap();
    let r = ReferenceLlama::new(&g).unwrap();
    (LlamaModel::new(Arc::new(g)).unwrap(), r)
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = freekv_model::sampling::Rng::new(seed);
    (0..n).map(|_| rng.below(300) as u32).collect()
}

#[test]
fn decode_step_by_step_matches_f64_reference() {
    for (seed, cfg) in [
        (1, TinyConfig::default()),
        (
            2,
            TinyConfig {
                matrix_type: GgmlType::Q8_0,
                embd_type: GgmlType::F32,
                tied: false,
                n_kv_heads: 4,
                ..TinyConfig::default()
            },
        ),
        (
            3,
            TinyConfig {
                matrix_type: GgmlType::F32,
                n_kv_heads: 1,
                n_layers: 3,
                ..TinyConfig::default()
            },
        ),
    ] {
        let (m, r) = tiny(seed, &cfg);
        let toks = tokens(40, seed);
        let want = r.forward(&toks).unwrap();
        let mut s = m.session(4).unwrap();
        for (i, &t) in toks.iter().enumerate() {
            let got = m.decode(&mut s, t).unwrap();
            let e = rel_l2(got, &want[i]);
            assert!(e <= 1e-4, "seed {seed} position {i}: relative error {e}");
        }
    }
}

#[test]
fn prefill_matches_reference_and_token_by_token_decode() {
    let (m, r) = tiny(4, &TinyConfig::default());
    let toks = tokens(70, 4);
    let want = r.forward(&toks).unwrap();
    // Prefill in uneven chunks, all logits.
    let mut s = m.session(32).unwrap();
    s.set_prefill_chunk(16);
    let all = m.prefill_all_logits(&mut s, &toks).unwrap();
    let v = m.vocab_size();
    for i in 0..toks.len() {
        let e = rel_l2(&all[i * v..(i + 1) * v], &want[i]);
        assert!(e <= 1e-4, "prefill position {i}: {e}");
    }
    // The streaming form gives the same logits, in order, and stops on a callback error.
    let mut t = m.session(32).unwrap();
    t.set_prefill_chunk(16);
    let mut seen = Vec::new();
    m.prefill_with_logits(&mut t, &toks, &mut |i, l| {
        assert_eq!(l, &all[i * v..(i + 1) * v]);
        seen.push(i);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, (0..toks.len()).collect::<Vec<_>>());
    assert_eq!(t.logits(), &all[(toks.len() - 1) * v..]);
    let mut u = m.session(32).unwrap();
    let r = m.prefill_with_logits(&mut u, &toks, &mut |i, _| {
        if i == 3 {
            Err(ModelError::Cancelled)
        } else {
            Ok(())
        }
    });
    assert!(matches!(r, Err(ModelError::Cancelled)));
    // Prefill of the first 50, then decode the rest, equals decoding everything.
    let mut a = m.session(32).unwrap();
    let last = m.prefill(&mut a, &toks[..50]).unwrap().to_vec();
    assert!(rel_l2(&last, &want[49]) <= 1e-4);
    let mut b = m.session(32).unwrap();
    let mut b_logits = Vec::new();
    for &t in &toks[..50] {
        b_logits = m.decode(&mut b, t).unwrap().to_vec();
    }
    assert!(
        rel_l2(
            &last,
            &b_logits.iter().map(|&x| x as f64).collect::<Vec<_>>()
        ) <= 1e-5
    );
    for &t in &toks[50..] {
        let la = m.decode(&mut a, t).unwrap().to_vec();
        let lb: Vec<f64> = m
            .decode(&mut b, t)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert!(rel_l2(&la, &lb) <= 1e-5);
    }
    assert_eq!(a.position(), 70);
}

#[test]
fn page_sizes_give_identical_logits() {
    let (m, _) = tiny(5, &TinyConfig::default());
    let toks = tokens(60, 5);
    let run = |page: usize| {
        let mut s = m.session(page).unwrap();
        let mut out = vec![m.prefill(&mut s, &toks[..20]).unwrap().to_vec()];
        for &t in &toks[20..] {
            out.push(m.decode(&mut s, t).unwrap().to_vec());
        }
        out
    };
    let a = run(1);
    assert_eq!(a, run(3));
    assert_eq!(a, run(32));
}

#[test]
fn bad_inputs_are_errors() {
    let (m, _) = tiny(6, &TinyConfig::default());
    let mut s = m.session(8).unwrap();
    assert!(matches!(m.prefill(&mut s, &[]), Err(ModelError::Prompt(_))));
    assert!(matches!(
        m.prefill(&mut s, &[1, 300]),
        Err(ModelError::Prompt(_))
    ));
    assert!(matches!(m.decode(&mut s, 1000), Err(ModelError::Prompt(_))));
    assert_eq!(s.position(), 0, "failed calls leave the session untouched");
    let long = vec![5u32; m.config().context_length + 1];
    assert!(matches!(
        m.prefill(&mut s, &long),
        Err(ModelError::Prompt(_))
    ));
    // Exactly the context fits; then decode reports a full context.
    s.set_context_length(16);
    m.prefill(&mut s, &[5; 16]).unwrap();
    assert!(matches!(m.decode(&mut s, 5), Err(ModelError::Prompt(_))));
    assert!(m.session(0).is_err());
}
