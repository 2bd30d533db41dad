//! Page summaries, page scoring, group-consistent top-k and the correction policy of FreeKV.
//! (Being written; see docs/ARCHITECTURE.md.)

mod error;
pub use error::SelectError;
