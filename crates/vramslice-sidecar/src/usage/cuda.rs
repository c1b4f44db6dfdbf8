//! The CUDA driver as a usage source: `cuMemGetInfo` on device 0 (the driver calls live in
//! `ffi::cuda`). Under the guard, the driver's answer is already the container's slice.

use super::{UsageError, UsageReading, UsageSource};
use crate::ffi::cuda::CudaMemInfo;

impl UsageSource for CudaMemInfo {
    fn read(&self) -> Result<UsageReading, UsageError> {
        let (free, total) = self.mem_get_info()?;
        Ok(UsageReading {
            used: total.saturating_sub(free),
            total: Some(total),
            peak: None,
            own: None,
            own_peak: None,
        })
    }
}
