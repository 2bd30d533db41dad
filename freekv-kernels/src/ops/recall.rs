//! FreeKV data-movement launchers (offload, gather, scatter, page copy).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};

use crate::KernelError;
use crate::kernels::func;

/// The functions of the `freekv_recall` module.
#[derive(Debug)]
pub struct RecallKernels {
    #[allow(dead_code)]
    placeholder: CudaFunction,
}

impl RecallKernels {
    /// Resolve every function of the loaded module.
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Self, KernelError> {
        Ok(Self {
            placeholder: func(m, "freekv_recall_placeholder")?,
        })
    }
}
