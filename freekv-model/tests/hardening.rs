//! Resource guards of the CPU decoder: the model file changed on disk while mapped, and the host
//! KV bound of a session.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use freekv_model::generate::{GenerateOptions, Generator, StopReason};
use freekv_model::gguf::GgufFile;
use freekv_model::llama::LlamaModel;
use freekv_model::testing::{TinyConfig, tiny_random_model, tiny_random_model_bytes};
use freekv_model::tokenizer::Tokenizer;
use freekv_model::{DenseKv, ModelError};

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Tmp {
    let dir = std::env::temp_dir().join(format!("freekv-hardening-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Tmp(dir)
}

fn changed(e: ModelError) -> String {
    let m = e.to_string();
    assert!(
        m.contains("the model file changed on disk while in use"),
        "{m}"
    );
    m
}

#[test]
fn a_file_replaced_by_rename_is_fine_one_written_in_place_is_refused() {
    let t = tmp("guard");
    let path = t.0.join("m.gguf");
    let bytes = tiny_random_model_bytes(3, &TinyConfig::default()).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let g = Arc::new(GgufFile::open(&path).unwrap());
    assert!(g.is_mapped());
    g.check_unchanged().unwrap();
    let model = LlamaModel::new(g.clone()).unwrap();
    let mut s = model.session(8).unwrap();
    model.prefill(&mut s, &[5, 6, 7]).unwrap();

    // A new file renamed over the path: the map still holds the old inode, nothing changed.
    let other = t.0.join("new.gguf");
    std::fs::write(
        &other,
        tiny_random_model_bytes(4, &TinyConfig::default()).unwrap(),
    )
    .unwrap();
    std::fs::rename(&other, &path).unwrap();
    g.check_unchanged().unwrap();
    model.decode(&mut s, 8).unwrap();

    // Written in place (the same bytes, even): refused by the check, by decode and by prefill.
    let g = Arc::new(GgufFile::open(&path).unwrap());
    let model = LlamaModel::new(g.clone()).unwrap();
    let mut s = model.session(8).unwrap();
    model.prefill(&mut s, &[5, 6, 7]).unwrap();
    // Metadata changes are harmless.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        g.check_unchanged().unwrap();
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    use std::io::Write;
    f.write_all(b"tail").unwrap();
    f.sync_all().unwrap();
    let m = changed(g.check_unchanged().unwrap_err());
    assert!(m.contains("its size went from"), "{m}");
    changed(model.decode(&mut s, 8).unwrap_err());
    let mut s2 = model.session(8).unwrap();
    changed(model.prefill(&mut s2, &[1]).unwrap_err());
}

#[test]
fn a_rewrite_with_the_old_size_and_time_is_still_seen() {
    let t = tmp("mtime");
    let path = t.0.join("m.gguf");
    let bytes = tiny_random_model_bytes(3, &TinyConfig::default()).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    let g = GgufFile::open(&path).unwrap();
    // Same length, one weight byte flipped, modification time put back (as `cp -p` or a
    // careless tool would): only the inode change time tells.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut changed_bytes = bytes.clone();
    if let Some(b) = changed_bytes.last_mut() {
        *b ^= 1;
    }
    std::fs::write(&path, &changed_bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_modified(before).unwrap();
    drop(f);
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        before
    );
    let e = g.check_unchanged();
    if cfg!(unix) {
        changed(e.unwrap_err());
    }
}

#[test]
fn in_memory_images_never_change() {
    let g = tiny_random_model(1, &TinyConfig::default()).unwrap();
    assert!(!g.is_mapped());
    g.check_unchanged().unwrap();
}

#[test]
fn opening_a_folder_is_an_error() {
    let t = tmp("dir");
    let e = GgufFile::open(&t.0).unwrap_err().to_string();
    assert!(
        e.contains("not a regular file") || e.contains("directory"),
        "{e}"
    );
}

#[test]
fn a_bounded_session_holds_what_the_bound_allows() {
    let cfg = TinyConfig {
        n_layers: 3,
        context_length: 512,
        ..TinyConfig::default()
    };
    let g = Arc::new(tiny_random_model(2, &cfg).unwrap());
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = LlamaModel::new(g).unwrap();
    let page = model.kv_page_bytes(8).unwrap();
    // 3 layers × 2 KV heads × 16 dims × 8 tokens × (K, V) × 4 bytes.
    assert_eq!(page, 2 * 16 * 8 * 2 * 4);
    assert_eq!(model.kv_cache_bytes(8, 17).unwrap(), 3 * 3 * page);

    // Room for 5 pages per layer (and a bit): 40 tokens.
    let limit = 5 * 3 * page + page / 2;
    let mut s = model
        .session_bounded(8, Box::new(DenseKv::new()), Some(limit))
        .unwrap();
    assert_eq!(s.context_length(), 40);
    let prompt: Vec<u32> = (0..30).map(|i| 3 + i * 7 % 290).collect();
    model.prefill(&mut s, &prompt).unwrap();
    assert_eq!(
        s.cache().pool().pages_in_use() * page,
        model.kv_cache_bytes(8, 30).unwrap()
    );
    let e = model.prefill(&mut s, &prompt).unwrap_err().to_string();
    assert!(e.contains("exceed the context of 40 tokens"), "{e}");

    // Generation stops at the bound's context, cleanly.
    let mut gen_ = Generator::with_session(&model, &tok, s);
    let opts = GenerateOptions {
        max_new_tokens: 100,
        stop_at_eog: false,
        top_logprobs: 0,
        ..GenerateOptions::default()
    };
    let out = gen_
        .generate(&prompt, &opts, &AtomicBool::new(false), &mut |_| {})
        .unwrap();
    assert_eq!(out.stop, StopReason::Context);
    assert_eq!(out.prompt_ids.len() + out.generated_ids.len(), 41);
    assert!(gen_.session().cache().pool().pages_in_use() <= 15);

    // A bound below one page per layer is refused up front.
    let e = model
        .session_bounded(8, Box::new(DenseKv::new()), Some(3 * page - 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no page"), "{e}");
}
