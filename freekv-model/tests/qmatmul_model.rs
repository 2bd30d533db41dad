//! `QMatrix` on the real SmolLM2-135M weights (Q4_1 projections, the Q8_0 embedding/head), against
//! dequantize-then-f64-dot. Skips when the default model is not cached.

use freekv_model::gguf::GgufFile;
use freekv_model::qmatmul::parallel::ThreadPool;
use freekv_model::qmatmul::{Isa, QMatrix};
use freekv_model::{quant, testing};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn real_weights_match_reference() {
    let Some(path) = testing::default_model_path() else {
        println!("skipped: default model not cached");
        return;
    };
    let g = GgufFile::open(&path).unwrap();
    let pool = ThreadPool::new(2);
    let mut rng = StdRng::seed_from_u64(2024);
    let mut isas = vec![Isa::Scalar];
    if Isa::Avx2.is_supported() {
        isas.push(Isa::Avx2);
    }
    for name in [
        "blk.0.attn_q.weight",
        "blk.7.attn_k.weight",
        "blk.29.ffn_down.weight",
        "token_embd.weight",
    ] {
        let t = g.tensor(name).unwrap();
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let data = g.tensor_data(t).unwrap();
        let m = QMatrix::new(t.ty, rows, cols, data).unwrap();
        // Check a window of rows of the 49152-row head; whole matrices otherwise.
        let check_rows = rows.min(3000);
        let w =
            quant::dequantize_to_vec(t.ty, &data[..check_rows * m.row_bytes()], check_rows * cols)
                .unwrap();
        let n = 5;
        let x: Vec<f32> = (0..n * cols)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        for &isa in &isas {
            let mut y = vec![0.0f32; n * rows];
            m.matmul_with(&pool, isa, &x, n, &mut y).unwrap();
            let mut yv = vec![0.0f32; rows];
            m.matvec_with(&pool, isa, &x[..cols], &mut yv).unwrap();
            for tok in 0..n {
                let xt = &x[tok * cols..(tok + 1) * cols];
                for r in 0..check_rows {
                    let wr = &w[r * cols..(r + 1) * cols];
                    let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let scale: f64 = wr
                        .iter()
                        .zip(xt)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    let got = y[tok * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * scale,
                        "{name} {isa:?} y[{tok}][{r}] = {got}, want {exact}"
                    );
                    if tok == 0 {
                        let gv = yv[r] as f64;
                        assert!(
                            (gv - exact).abs() <= 1e-5 * scale,
                            "{name} {isa:?} matvec[{r}] = {gv}, want {exact}"
                        );
                    }
                }
            }
        }
    }
}
