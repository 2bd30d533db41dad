//! The FreeKV recall engine: recall plans and double-buffered streamed executors.
//! (Being written; see docs/ARCHITECTURE.md.)

mod error;
pub use error::RecallError;
