//! `FREEKV_NO_SIMD=1`: the portable attention, softmax and SwiGLU kernels (and the scalar matrix
//! products) give the same exactness and page-size independence. One test per file: the
//! variable is set before anything reads it.

use std::sync::Arc;

use freekv_model::llama::LlamaModel;
use freekv_model::qmatmul::{Isa, NO_SIMD_ENV};
use freekv_model::testing::{ReferenceLlama, TinyConfig, rel_l2, tiny_random_model};

#[test]
fn portable_kernels_match_the_reference() {
    // SAFETY: this binary's only test; no other thread reads the environment yet.
    unsafe { std::env::set_var(NO_SIMD_ENV, "1") };
    assert_eq!(Isa::active(), Isa::Scalar);
    let g = tiny_random_model(11, &TinyConfig::default()).unwrap();
    let r = ReferenceLlama::new(&g).unwrap();
    let m = LlamaModel::new(Arc::new(g)).unwrap();
    let mut rng = freekv_model::sampling::Rng::new(11);
    let toks: Vec<u32> = (0..45).map(|_| rng.below(300) as u32).collect();
    let want = r.forward(&toks).unwrap();
    let run = |page: usize| {
        let mut s = m.session(page).unwrap();
        let mut out = vec![m.prefill(&mut s, &toks[..9]).unwrap().to_vec()];
        for &t in &toks[9..] {
            out.push(m.decode(&mut s, t).unwrap().to_vec());
        }
        out
    };
    let a = run(3);
    for (i, l) in a.iter().enumerate() {
        let e = rel_l2(l, &want[i + 8]);
        assert!(e <= 1e-4, "position {}: {e}", i + 8);
    }
    assert_eq!(a, run(1));
    assert_eq!(a, run(32));
}
