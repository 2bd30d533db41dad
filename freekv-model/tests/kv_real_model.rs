//! KV-policy invariants on the default model (skipped when it is not cached): a budget covering
//! the context equals full attention exactly; quest, arkvale and freekv (τ = always) agree
//! bitwise; recalled slots equal the host pages at every step (debug checks).

use std::sync::{Arc, Mutex};

use freekv_model::eval::{PasskeySpec, argmax, make_passkey_cases};
use freekv_model::kv::{AttendedPages, KvConfig, KvKind, SharedKv, SparseKv};
use freekv_model::testing::default_model_path;
use freekv_model::{ChatTemplate, DenseKv, GgufFile, KvPolicy, LlamaModel, Tokenizer};

fn cfg(kind: KvKind, budget: usize) -> KvConfig {
    KvConfig {
        kind,
        budget,
        sink: 16,
        window: 32,
        page_size: 8,
        summary: freekv_select::SummaryKind::ArkVale,
        debug_checks: true,
        ..KvConfig::default()
    }
}

#[test]
fn policies_on_the_default_model() {
    let Some(path) = default_model_path() else {
        println!("skipped: default model not cached");
        return;
    };
    let g = Arc::new(GgufFile::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let tpl = ChatTemplate::from_gguf(&g).unwrap();
    let m = LlamaModel::new(g).unwrap();
    let n_layers = m.config().n_layers;
    let spec = PasskeySpec {
        length: 700,
        depth: Some(0.5),
        n: 1,
        seed: 3,
        max_new_tokens: 8,
    };
    let case = make_passkey_cases(&tok, tpl.as_ref(), &spec)
        .unwrap()
        .remove(0);
    let ids = case.prompt_ids.clone().unwrap();
    let feed = tok
        .encode(
            &format!(" {}. It is {} indeed.", case.answer, case.answer),
            false,
        )
        .unwrap();

    let shared = SharedKv::new(Box::new(DenseKv::new()));
    let mut s = m.session_with_policy(8, shared.boxed()).unwrap();
    let first = m.prefill(&mut s, &ids).unwrap().to_vec();
    let mut run = |c: &KvConfig| -> (Vec<Vec<f32>>, Vec<AttendedPages>) {
        s.truncate(ids.len());
        let trace = Arc::new(Mutex::new(Vec::new()));
        let p: Box<dyn KvPolicy> = match c.kind {
            KvKind::Full => Box::new(DenseKv::new()),
            _ => Box::new(
                SparseKv::new(c, n_layers)
                    .unwrap()
                    .with_trace(Arc::clone(&trace)),
            ),
        };
        shared.replace(p);
        let logits = feed
            .iter()
            .map(|&t| m.decode(&mut s, t).unwrap().to_vec())
            .collect();
        let tr = trace.lock().unwrap().clone();
        (logits, tr)
    };
    let full = run(&cfg(KvKind::Full, 128));
    // Greedy full attention finds the key (the model's first answer token is its first digit).
    let key_first = tok.encode(&case.answer, false).unwrap()[0];
    let space_key = tok.encode(&format!(" {}", case.answer), false).unwrap()[0];
    assert!(
        argmax(&first) == key_first || argmax(&first) == space_key,
        "full attention should start the key"
    );
    // A budget covering the context: exactly full attention.
    for kind in [KvKind::Quest, KvKind::ArkVale, KvKind::FreeKv] {
        let (l, t) = run(&cfg(kind, 1024));
        assert_eq!(l, full.0, "{kind} with budget ≥ context");
        assert!(t.is_empty());
    }
    // A small budget: quest = arkvale = freekv(always), bitwise.
    let quest = run(&cfg(KvKind::Quest, 128));
    let ark = run(&cfg(KvKind::ArkVale, 128));
    let mut fk = cfg(KvKind::FreeKv, 128);
    fk.set_tau("always").unwrap();
    let free = run(&fk);
    assert_eq!(quest.1.len(), feed.len() * (n_layers - 1) * 3);
    assert_eq!(quest.1, ark.1);
    assert_eq!(free.1, ark.1);
    assert_eq!(quest.0, ark.0);
    assert_eq!(free.0, ark.0);
    assert_ne!(ark.0, full.0, "the sparse run differs from full attention");
    // The default τ runs with its checks on.
    let fk = cfg(KvKind::FreeKv, 128);
    let (l, _) = run(&fk);
    assert_eq!(l.len(), feed.len());
    let stats = shared.lock().stats().unwrap();
    assert!(stats["correction_checks"].as_u64().unwrap() > 0, "{stats}");
}
