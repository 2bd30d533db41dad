//! FreeKV selection launchers (correction flags, fused selection).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};

use crate::KernelError;
use crate::kernels::func;

/// The functions of the `freekv_select` module.
#[derive(Debug)]
pub struct SelectKernels {
    #[allow(dead_code)]
    placeholder: CudaFunction,
}

impl SelectKernels {
    /// Resolve every function of the loaded module.
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Self, KernelError> {
        Ok(Self {
            placeholder: func(m, "freekv_select_placeholder")?,
        })
    }
}
