//! Argmax and temperature / top-k / top-p sampling against a CPU reference of the same
//! definition (see `SamplingInputs`).
#![allow(clippy::needless_range_loop)] // index-based scalar references read like the math
#![allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x > y)` mirrors the kernel's NaN handling

mod common;

use common::*;
use freekv_kernels::SamplingInputs;
use freekv_kernels::testing::gpu;
use rand::Rng;

fn key(x: f32, i: u32) -> u64 {
    let ord = if x.is_nan() {
        0
    } else {
        let b = x.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    };
    ((ord as u64) << 32) | (!i) as u64
}

fn argmax_ref(x: &[f32]) -> i32 {
    (0..x.len()).max_by_key(|&i| key(x[i], i as u32)).unwrap() as i32
}

fn weight(x: f32, xm: f32, inv_t: f32) -> u64 {
    let e = ((x - xm) * inv_t).exp();
    if e > 0.0 {
        (e * 4294967296.0f32) as u64
    } else {
        0
    }
}

fn clamp_target(t: f64, total: u64) -> u64 {
    if !(t >= 1.0) {
        1
    } else if t >= total as f64 {
        total
    } else {
        t as u64
    }
}

fn sample_ref(x: &[f32], t: f32, k: i32, p: f32, u: f32) -> i32 {
    let top = argmax_ref(x);
    let xm = x[top as usize];
    if !(t > 0.0) || k == 1 || !(xm > f32::NEG_INFINITY) || xm == f32::INFINITY {
        return top;
    }
    let u = if u >= 0.0 { u } else { 0.0 };
    let inv_t = 1.0 / t;
    let v = x.len();
    let mut order: Vec<u32> = (0..v as u32).collect();
    order.sort_unstable_by_key(|&i| std::cmp::Reverse(key(x[i as usize], i)));
    let kk = if k > 0 && (k as usize) < v {
        k as usize
    } else {
        v
    };
    let mut cum = Vec::with_capacity(kk);
    let mut acc = 0u64;
    for &i in &order[..kk] {
        acc += weight(x[i as usize], xm, inv_t);
        cum.push(acc);
    }
    let z = cum[kk - 1];
    let mut cut = kk - 1;
    if p < 1.0 {
        let tp = clamp_target(((p as f64) * z as f64).ceil(), z);
        cut = cum.iter().position(|&c| c >= tp).unwrap();
    }
    let zp = cum[cut];
    let ts = clamp_target((u as f64 * zp as f64).floor() + 1.0, zp);
    let pick = cum[..=cut].iter().position(|&c| c >= ts).unwrap();
    order[pick] as i32
}

#[test]
fn argmax_ties_nan_and_infinities() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0xA7);
    for &vocab in &[1usize, 7, 1000, 49152, 128_256] {
        let rows = 6;
        let mut x = rand_f32(&mut r, rows * vocab, -10.0, 10.0);
        // Row 1: ties at the maximum (lowest index wins); row 2: NaNs and -inf; row 3: all -inf.
        if vocab > 5 {
            x[vocab + 2] = 50.0;
            x[vocab + vocab - 1] = 50.0;
            x[2 * vocab] = f32::NAN;
            x[2 * vocab + 3] = f32::NEG_INFINITY;
        }
        for v in &mut x[3 * vocab..4 * vocab] {
            *v = f32::NEG_INFINITY;
        }
        let dx = up(s, &x);
        let mut out = poison_i32(s, rows);
        g.kernels().argmax(s, &dx, rows, vocab, &mut out).unwrap();
        let got = down(s, &out);
        let want: Vec<i32> = (0..rows)
            .map(|i| argmax_ref(&x[i * vocab..(i + 1) * vocab]))
            .collect();
        assert_eq!(got, want, "argmax vocab={vocab}");
    }
}

#[test]
fn sampling_matches_reference_exactly() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0x5A3);
    for &(vocab, rows) in &[(50usize, 96usize), (5000, 96), (49152, 96), (128_256, 32)] {
        let mut x = Vec::with_capacity(rows * vocab);
        for row in 0..rows {
            let scale = [1.0f32, 3.0, 8.0][row % 3];
            for _ in 0..vocab {
                let v: f32 = r.random_range(-1.0f32..1.0) * scale;
                // Every fourth row is quantised so that many logits tie.
                x.push(if row % 4 == 1 {
                    (v * 2.0).round() / 2.0
                } else {
                    v
                });
            }
        }
        // Random combinations; top_k <= 1024 takes the shared-memory sort, larger or disabled
        // top_k the radix-selection path.
        let temps: Vec<f32> = (0..rows)
            .map(|_| [0.0f32, 0.5, 1.0, 1.7][r.random_range(0..4)])
            .collect();
        let ks: Vec<i32> = (0..rows)
            .map(|_| [0i32, 1, 5, 40, 1024, 3000][r.random_range(0..6)])
            .collect();
        let ps: Vec<f32> = (0..rows)
            .map(|_| [1.0f32, 0.9, 0.5, 0.0][r.random_range(0..4)])
            .collect();
        let us: Vec<f32> = (0..rows).map(|_| r.random_range(0.0f32..1.0)).collect();
        let (dx, dt, dk, dp, du) = (up(s, &x), up(s, &temps), up(s, &ks), up(s, &ps), up(s, &us));
        let mut out = poison_i32(s, rows);
        let inputs = SamplingInputs {
            temperature: &dt,
            top_k: &dk,
            top_p: &dp,
            uniform: &du,
        };
        g.kernels()
            .sample(s, &dx, rows, vocab, &inputs, &mut out)
            .unwrap();
        let got = down(s, &out);
        for i in 0..rows {
            let want = sample_ref(
                &x[i * vocab..(i + 1) * vocab],
                temps[i],
                ks[i],
                ps[i],
                us[i],
            );
            assert_eq!(
                got[i], want,
                "sample vocab={vocab} row={i} T={} k={} p={} u={}",
                temps[i], ks[i], ps[i], us[i]
            );
        }
    }
}

#[test]
fn sampling_frequencies_follow_the_distribution() {
    // Many uniforms over one row: the empirical frequencies match softmax(x / T) over the top-k.
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0x5A4);
    let vocab = 32;
    let rows = 20_000;
    let row: Vec<f32> = rand_f32(&mut r, vocab, -2.0, 2.0);
    let x: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
    let (t, k) = (0.8f32, 10i32);
    let us: Vec<f32> = (0..rows).map(|_| r.random_range(0.0f32..1.0)).collect();
    let (dx, dt, dk, dp, du) = (
        up(s, &x),
        up(s, &vec![t; rows]),
        up(s, &vec![k; rows]),
        up(s, &vec![1.0f32; rows]),
        up(s, &us),
    );
    let mut out = poison_i32(s, rows);
    let inputs = SamplingInputs {
        temperature: &dt,
        top_k: &dk,
        top_p: &dp,
        uniform: &du,
    };
    g.kernels()
        .sample(s, &dx, rows, vocab, &inputs, &mut out)
        .unwrap();
    let got = down(s, &out);
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
    let m = row[order[0]] as f64;
    let w: Vec<f64> = order[..k as usize]
        .iter()
        .map(|&i| ((row[i] as f64 - m) / t as f64).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let mut counts = vec![0usize; vocab];
    for &id in &got {
        counts[id as usize] += 1;
    }
    for (j, &i) in order.iter().enumerate() {
        let p = if j < k as usize { w[j] / z } else { 0.0 };
        let freq = counts[i] as f64 / rows as f64;
        let sd = (p * (1.0 - p) / rows as f64).sqrt();
        assert!(
            (freq - p).abs() <= 5.0 * sd + 1e-9,
            "token {i}: freq {freq} vs p {p}"
        );
    }
}
