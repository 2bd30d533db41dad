//! The CUDA side of recall: the pinned, mapped HND host pool of every layer's KV history and the
//! GPU recall executors (zero-copy gather and double-buffered streamed copy). Being written.
