//! Where FreeKV keeps its files: the cache directory (`$FREEKV_HOME`) and the default model in it.
//!
//! ```
//! use freekv_model::paths::{default_model_location, freekv_home};
//! // SAFETY: a doctest runs in a process of its own, on one thread.
//! unsafe {
//!     std::env::set_var("FREEKV_HOME", "cache-dir");
//!     std::env::remove_var("FREEKV_MODEL");
//! }
//! assert_eq!(freekv_home(), Some("cache-dir".into()));
//! let model = default_model_location().unwrap();
//! assert!(model.ends_with("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
//! ```

use std::path::PathBuf;

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Environment variable naming a model file directly.
pub const MODEL_ENV: &str = "FREEKV_MODEL";
/// Environment variable naming the FreeKV cache directory.
pub const HOME_ENV: &str = "FREEKV_HOME";

/// The FreeKV cache directory: `$FREEKV_HOME`, else `$XDG_CACHE_HOME/freekv`, else
/// `$HOME/.cache/freekv` (`None` when none of these variables is set).
pub fn freekv_home() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(h) = var(HOME_ENV) {
        return Some(PathBuf::from(h));
    }
    if let Some(x) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("freekv"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache").join("freekv"))
}

/// Where the default model is expected: `$FREEKV_MODEL`, else
/// `<freekv_home>/models/SmolLM2-135M-Instruct.Q4_1.gguf` (whether or not it exists).
pub fn default_model_location() -> Option<PathBuf> {
    if let Some(m) = std::env::var_os(MODEL_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(m));
    }
    freekv_home().map(|h| h.join("models").join(DEFAULT_MODEL_FILE))
}

/// The default model file, if it is present (see [`default_model_location`]).
pub fn default_model_path() -> Option<PathBuf> {
    default_model_location().filter(|p| p.is_file())
}
