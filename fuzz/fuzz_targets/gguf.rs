//! The GGUF reader on arbitrary bytes: parse, then every accessor `freekv info` and the loaders
//! reach (summary, metadata rendering, tensor bytes and dequantization, the Llama config, the
//! chat template). Nothing may panic, read out of bounds or allocate by an unchecked header
//! value. The heavier consumers (tokenizer, CPU model) are the `gguf_model` target.
#![no_main]

use freekv_model::chat::ChatTemplate;
use freekv_model::config::LlamaConfig;
use freekv_model::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let _ = g.summary();
    for (k, v) in g.metadata() {
        let _ = (k.len(), v.to_string(), v.as_u64(), v.as_i64(), v.as_f64());
    }
    for t in g.tensors() {
        let data = g.tensor_data(t).expect("validated at parse");
        assert_eq!(data.len() as u64, t.n_bytes);
        if let Ok(v) = g.tensor_f32(&t.name) {
            assert_eq!(v.len() as u64, t.n_elements());
        }
    }
    if let Ok(c) = LlamaConfig::from_gguf(&g) {
        assert_eq!(c.inv_freqs().len(), c.rope_dim / 2);
    }
    let _ = ChatTemplate::from_gguf(&g);
    assert!(g.check_unchanged().is_ok());
});
