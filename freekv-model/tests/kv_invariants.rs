//! Invariants of the KV policies on tiny random models: exactness where the budget covers the
//! context, `quest` = `arkvale` and `freekv` (τ = always) = `arkvale` bitwise, deterministic
//! selections, recalled slots equal to the host pages and consistent page tables at every step.

use std::sync::{Arc, Mutex};

use freekv_model::kv::{AttendedPages, KvConfig, KvKind, SparseKv, build_policy};
use freekv_model::testing::{TinyConfig, tiny_random_model};
use freekv_model::{KvPolicy, LlamaModel};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn model(seed: u64, layers: usize, ctx: usize) -> LlamaModel {
    let cfg = TinyConfig {
        n_layers: layers,
        context_length: ctx,
        ..TinyConfig::default()
    };
    LlamaModel::new(Arc::new(tiny_random_model(seed, &cfg).unwrap())).unwrap()
}

fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(3..vocab as u32)).collect()
}

/// Small budget: page 4, sink 4 (1 page), window 8 (2 pages), 24 tokens → 3 retrieved pages.
fn small(kind: KvKind) -> KvConfig {
    KvConfig {
        kind,
        budget: 24,
        sink: 4,
        window: 8,
        page_size: 4,
        debug_checks: true,
        ..KvConfig::default()
    }
}

struct Run {
    logits: Vec<Vec<f32>>,
    trace: Vec<AttendedPages>,
    stats: serde_json::Value,
}

/// Prefill `prompt`, then decode `steps` tokens teacher-forced from `feed` (so every policy sees
/// the same inputs), recording the logits of every step.
fn run(m: &LlamaModel, cfg: &KvConfig, prompt: &[u32], feed: &[u32]) -> Run {
    let n_layers = m.config().n_layers;
    let trace = Arc::new(Mutex::new(Vec::new()));
    let policy: Box<dyn KvPolicy> = match cfg.kind {
        KvKind::Full => build_policy(cfg, n_layers).unwrap(),
        _ => Box::new(
            SparseKv::new(cfg, n_layers)
                .unwrap()
                .with_trace(Arc::clone(&trace)),
        ),
    };
    let mut s = m.session_with_policy(cfg.page_size, policy).unwrap();
    let mut logits = vec![m.prefill(&mut s, prompt).unwrap().to_vec()];
    for &t in feed {
        logits.push(m.decode(&mut s, t).unwrap().to_vec());
    }
    let stats = s.policy().stats().unwrap_or(serde_json::Value::Null);
    let trace = trace.lock().unwrap().clone();
    Run {
        logits,
        trace,
        stats,
    }
}

#[test]
fn budget_covering_the_context_equals_full_attention_exactly() {
    let m = model(11, 3, 512);
    let prompt = tokens(1, 70, 300);
    let feed = tokens(2, 40, 300);
    let full = run(&m, &KvConfig::new(KvKind::Full), &prompt, &feed);
    for kind in [KvKind::Quest, KvKind::ArkVale, KvKind::FreeKv] {
        for dense in [vec![0], vec![]] {
            let cfg = KvConfig {
                budget: 112, // 28 pages of 4 ≥ 110 tokens
                dense_layers: dense.clone(),
                ..small(kind)
            };
            let r = run(&m, &cfg, &prompt, &feed);
            assert_eq!(r.logits, full.logits, "{kind} dense {dense:?}");
            assert_eq!(r.stats["sparse_layer_steps"], 0, "{kind}");
            assert!(r.trace.is_empty());
        }
    }
}

#[test]
fn quest_arkvale_and_freekv_always_agree_bitwise() {
    let m = model(5, 3, 512);
    let prompt = tokens(3, 90, 300);
    let feed = tokens(4, 120, 300);
    let quest = run(&m, &small(KvKind::Quest), &prompt, &feed);
    let ark = run(&m, &small(KvKind::ArkVale), &prompt, &feed);
    let mut fk = small(KvKind::FreeKv);
    fk.set_tau("always").unwrap();
    let free = run(&m, &fk, &prompt, &feed);
    // Sparse from the first step: 90 tokens = 23 pages > 6.
    assert_eq!(ark.stats["sparse_layer_steps"], 2 * 120);
    assert_eq!(quest.trace.len(), 2 * 120 * 2);
    assert_eq!(
        quest.trace, ark.trace,
        "quest and arkvale select the same pages"
    );
    assert_eq!(
        free.trace, ark.trace,
        "freekv(always) attends what arkvale attends"
    );
    assert_eq!(quest.logits, ark.logits);
    assert_eq!(free.logits, ark.logits);
    // Every correction check flags every head; the recall went through the slots.
    assert_eq!(free.stats["correction_rate_kv_head"], 1.0);
    assert!(ark.stats["units_sync"].as_u64().unwrap() > 0);
    // And the sparse result is not the dense one (the test could fail).
    let full = run(&m, &KvConfig::new(KvKind::Full), &prompt, &feed);
    assert_ne!(full.logits, ark.logits);
}

#[test]
fn freekv_speculates_and_corrects_deterministically() {
    let m = model(8, 3, 512);
    let prompt = tokens(5, 80, 300);
    let feed = tokens(6, 100, 300);
    let mut cfg = small(KvKind::FreeKv);
    // Random weights and tokens give group cosines around 0: τ = 0.05 flags about half.
    cfg.set_tau("0.05").unwrap();
    let a = run(&m, &cfg, &prompt, &feed);
    let b = run(&m, &cfg, &prompt, &feed);
    assert_eq!(a.trace, b.trace, "selections are deterministic");
    assert_eq!(a.logits, b.logits);
    // Inline speculative recall: same pages, same logits.
    cfg.spec_recall = freekv_model::kv::SpecRecall::Inline;
    let c = run(&m, &cfg, &prompt, &feed);
    assert_eq!(a.trace, c.trace);
    assert_eq!(a.logits, c.logits);
    let s = &a.stats;
    assert!(s["units_async"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["first_sparse_steps"], 2, "{s}");
    assert_eq!(s["correction_checks"], 2 * 100 - 2, "{s}");
    let flagged = s["heads_flagged"].as_u64().unwrap();
    assert!(
        flagged > 0 && flagged < s["heads_checked"].as_u64().unwrap(),
        "{s}"
    );
    // τ = -1 never corrects: every recall after the first step is speculative.
    cfg.set_tau("-1").unwrap();
    let never = run(&m, &cfg, &prompt, &feed);
    assert_eq!(never.stats["heads_flagged"], 0);
    assert_eq!(
        never.stats["units_sync"].as_u64().unwrap(),
        2 * 2 * 3,
        "only the first sparse step of each layer recalls synchronously (2 layers × 2 heads × k=3)"
    );
}

#[test]
fn freekv_lags_one_step_behind_quest() {
    // With τ = -1 (never correct), freekv attends at step t what quest selected at step t-1
    // (same layer, same head), once both are sparse — the definition of speculation.
    let m = model(21, 2, 512);
    let prompt = tokens(9, 64, 300);
    let feed = tokens(10, 60, 300);
    let quest = run(&m, &small(KvKind::Quest), &prompt, &feed);
    let mut cfg = small(KvKind::FreeKv);
    cfg.set_tau("-1").unwrap();
    let free = run(&m, &cfg, &prompt, &feed);
    let pages = |step: u64, tr: &[AttendedPages]| {
        tr.iter()
            .find(|a| a.step == step && a.layer == 1 && a.kv_head == 0)
            .map(|a| a.pages.clone())
            .unwrap()
    };
    // Layer 0 is dense, so layer 1 sees the same query at step 0 in both runs.
    let q0 = pages(0, &quest.trace);
    assert_eq!(
        pages(0, &free.trace),
        q0,
        "the first sparse step selects with q_0"
    );
    assert_eq!(
        pages(1, &free.trace),
        q0,
        "step 1 attends what q_0 selected"
    );
    let lagged = (1..60u64)
        .filter(|&t| pages(t, &free.trace) != pages(t, &quest.trace))
        .count();
    assert!(
        lagged > 0,
        "speculation never lagged: the test would not see a difference"
    );
}

#[test]
fn long_random_run_keeps_tables_consistent() {
    // Page size 2 and a tiny budget make pages open, leave the window and get recalled often;
    // debug checks compare every resident slot with the host page at every step.
    let m = model(33, 3, 4096);
    let prompt = tokens(7, 40, 300);
    let feed = tokens(8, 3000, 300);
    let mut cfg = KvConfig {
        kind: KvKind::FreeKv,
        budget: 16,
        sink: 2,
        window: 4,
        page_size: 2,
        debug_checks: true,
        ..KvConfig::default()
    };
    cfg.set_tau("0.5").unwrap();
    let r = run(&m, &cfg, &prompt, &feed);
    assert_eq!(r.logits.len(), 3001);
    let s = &r.stats;
    assert_eq!(s["steps"], 3000);
    let flagged = s["heads_flagged"].as_u64().unwrap();
    let checked = s["heads_checked"].as_u64().unwrap();
    assert!(flagged > 0 && flagged < checked, "{s}");
    let ark = run(
        &m,
        &KvConfig {
            kind: KvKind::ArkVale,
            ..cfg.clone()
        },
        &prompt,
        &feed,
    );
    assert_eq!(ark.stats["steps"], 3000);
}

#[test]
fn bad_configurations_are_errors() {
    let m = model(1, 2, 256);
    let n = m.config().n_layers;
    let mut c = small(KvKind::FreeKv);
    c.budget = 12; // = sink 4 + window 8: no page left to retrieve
    let e = build_policy(&c, n).err().unwrap().to_string();
    assert!(e.contains("smaller than sink 4 + window 8"), "{e}");
    c.budget = 24;
    c.dense_layers = vec![2];
    assert!(
        build_policy(&c, n)
            .err()
            .unwrap()
            .to_string()
            .contains("dense layer 2")
    );
    c.dense_layers = vec![0];
    c.page_size = 0;
    assert!(build_policy(&c, n).is_err());
    // A session whose page size differs from the policy's is refused at the first step.
    c.page_size = 4;
    let mut s = m
        .session_with_policy(8, build_policy(&c, n).unwrap())
        .unwrap();
    let e = m
        .prefill(&mut s, &tokens(1, 20, 300))
        .unwrap_err()
        .to_string();
    assert!(e.contains("page size"), "{e}");
}
