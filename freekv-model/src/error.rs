use thiserror::Error;

/// Everything that can go wrong while loading, tokenizing or running a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A GGUF file is malformed, truncated or unsupported; names the file and the problem.
    #[error("{path}: {msg}")]
    Gguf { path: String, msg: String },
    /// A required tensor is missing from the model file.
    #[error("model file has no tensor `{0}`")]
    MissingTensor(String),
    /// A required metadata key is missing from the model file.
    #[error("model file has no metadata key `{0}`")]
    MissingMetadata(String),
    /// A metadata value has the wrong type or an invalid value.
    #[error("metadata `{key}`: {msg}")]
    BadMetadata { key: String, msg: String },
    /// A tensor has the wrong shape or type for its role.
    #[error("tensor shape or type: {0}")]
    Shape(String),
    /// The tokenizer could not be built or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// The prompt is empty, too long, or holds invalid token ids.
    #[error("prompt: {0}")]
    Prompt(String),
    /// A run configuration value is invalid.
    #[error("config: {0}")]
    Config(String),
    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Generation was cancelled (Ctrl-C); what was generated so far is kept by the caller.
    #[error("cancelled")]
    Cancelled,
    /// From freekv-layout.
    #[error(transparent)]
    Layout(#[from] freekv_layout::LayoutError),
    /// From freekv-select.
    #[error(transparent)]
    Select(#[from] freekv_select::SelectError),
    /// From freekv-recall.
    #[error(transparent)]
    Recall(#[from] freekv_recall::RecallError),
    /// From freekv-kernels.
    #[error(transparent)]
    Kernel(#[from] freekv_kernels::KernelError),
}
