//! Where the model runs: a CUDA GPU through cudarc (driver loaded at run time, kernel shipped as
//! PTX), or the CPU when no driver is present. On the CPU a simulated device memory with a hard
//! limit stands in for the GPU's (as the guard would enforce it), so admission, profiling and
//! out-of-memory retry behave as they would on a GPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use vramslice_sidecar::{CUDA_ERROR_OUT_OF_MEMORY, CudaError, ManualUsage, OutOfMemory};

use crate::model::{ModelSpec, Weights, forward_cpu};

/// A failure on the device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    /// The device (or the guard) refused an allocation.
    #[error("{0}")]
    OutOfMemory(CudaError),
    /// Anything else the driver reported.
    #[error("CUDA: {0}")]
    Driver(String),
}

impl OutOfMemory for DeviceError {
    fn is_out_of_memory(&self) -> bool {
        matches!(self, DeviceError::OutOfMemory(_))
    }
}

impl From<cudarc::driver::DriverError> for DeviceError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            DeviceError::OutOfMemory(CudaError(CUDA_ERROR_OUT_OF_MEMORY))
        } else {
            DeviceError::Driver(e.to_string())
        }
    }
}

/// Simulated device memory with a hard limit; mirrors its usage into a [`ManualUsage`] that
/// the sidecar runtime reads.
#[derive(Debug, Clone)]
pub struct SimVram {
    limit: u64,
    used: Arc<AtomicU64>,
    usage: ManualUsage,
}

/// An allocation in [`SimVram`], freed on drop.
#[derive(Debug)]
pub struct SimAlloc {
    vram: SimVram,
    bytes: u64,
}

impl Drop for SimAlloc {
    fn drop(&mut self) {
        self.vram.used.fetch_sub(self.bytes, Ordering::SeqCst);
        self.vram.usage.sub(self.bytes);
    }
}

impl SimVram {
    /// A device of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Arc::new(AtomicU64::new(0)),
            usage: ManualUsage::new(0, limit),
        }
    }

    /// The usage source to give the runtime.
    pub fn usage(&self) -> ManualUsage {
        self.usage.clone()
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Allocate, or fail with `CUDA_ERROR_OUT_OF_MEMORY` past the limit.
    pub fn alloc(&self, bytes: u64) -> Result<SimAlloc, DeviceError> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .map_err(|_| DeviceError::OutOfMemory(CudaError(CUDA_ERROR_OUT_OF_MEMORY)))?;
        self.usage.add(bytes);
        Ok(SimAlloc {
            vram: self.clone(),
            bytes,
        })
    }
}

/// `dense_relu(w, bias, x, y, d, n)`: `y[b·d + j] = max(0, Σ_i w[j·d + i]·x[b·d + i] + bias[j])`
/// for every `b·d + j < n`. Hand-written PTX: the driver JIT-compiles it, no toolkit needed.
pub const DENSE_RELU_PTX: &str = r#"
.version 6.4
.target sm_52
.address_size 64

.visible .entry dense_relu(
    .param .u64 p_w, .param .u64 p_bias, .param .u64 p_x, .param .u64 p_y,
    .param .u32 p_d, .param .u32 p_n)
{
    .reg .pred %p<3>;
    .reg .b32 %r<12>;
    .reg .f32 %f<6>;
    .reg .b64 %rd<12>;

    ld.param.u64 %rd1, [p_w];
    ld.param.u64 %rd2, [p_bias];
    ld.param.u64 %rd3, [p_x];
    ld.param.u64 %rd4, [p_y];
    ld.param.u32 %r1, [p_d];
    ld.param.u32 %r2, [p_n];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    cvta.to.global.u64 %rd4, %rd4;
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r6, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r6, %r2;
    @%p1 bra DONE;
    div.u32 %r7, %r6, %r1;
    rem.u32 %r8, %r6, %r1;
    mul.wide.u32 %rd5, %r8, %r1;
    shl.b64 %rd5, %rd5, 2;
    add.s64 %rd5, %rd1, %rd5;
    mul.wide.u32 %rd6, %r7, %r1;
    shl.b64 %rd6, %rd6, 2;
    add.s64 %rd6, %rd3, %rd6;
    mov.f32 %f1, 0f00000000;
    mov.u32 %r9, 0;
LOOP:
    setp.ge.u32 %p2, %r9, %r1;
    @%p2 bra END_LOOP;
    ld.global.f32 %f2, [%rd5];
    ld.global.f32 %f3, [%rd6];
    fma.rn.f32 %f1, %f2, %f3, %f1;
    add.s64 %rd5, %rd5, 4;
    add.s64 %rd6, %rd6, 4;
    add.u32 %r9, %r9, 1;
    bra LOOP;
END_LOOP:
    mul.wide.u32 %rd7, %r8, 4;
    add.s64 %rd7, %rd2, %rd7;
    ld.global.f32 %f4, [%rd7];
    add.f32 %f1, %f1, %f4;
    max.f32 %f1, %f1, 0f00000000;
    mul.wide.u32 %rd8, %r6, 4;
    add.s64 %rd8, %rd4, %rd8;
    st.global.f32 [%rd8], %f1;
DONE:
    ret;
}
"#;

/// The CUDA side: context, stream and the loaded kernel.
pub struct Cuda {
    stream: Arc<CudaStream>,
    kernel: CudaFunction,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cuda")
    }
}

impl Cuda {
    /// Open GPU 0 and load the kernel; `None` when no CUDA driver is installed.
    pub fn open() -> Result<Option<Self>, DeviceError> {
        // SAFETY: only probes whether libcuda can be loaded; no CUDA call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Ok(None);
        }
        let ctx = CudaContext::new(0)?;
        let module = ctx.load_module(Ptx::from_src(DENSE_RELU_PTX))?;
        let kernel = module.load_function("dense_relu")?;
        Ok(Some(Self {
            stream: ctx.default_stream(),
            kernel,
        }))
    }
}

/// Where the model lives.
#[derive(Debug)]
pub enum Loaded {
    /// On the CPU, with its simulated device memory held.
    Cpu {
        /// The weights.
        weights: Arc<Weights>,
        /// Simulated device memory holding them.
        _held: SimAlloc,
        /// The simulated device.
        vram: SimVram,
    },
    /// On the GPU.
    Cuda {
        /// Shape.
        spec: ModelSpec,
        /// Per layer weights.
        w: Vec<CudaSlice<f32>>,
        /// Per layer biases.
        b: Vec<CudaSlice<f32>>,
        /// Kernel and stream.
        cuda: Arc<Cuda>,
    },
}

/// Load `weights` onto the CPU's simulated device or the GPU.
pub fn load(
    weights: Weights,
    cpu: Option<&SimVram>,
    cuda: Option<&Arc<Cuda>>,
) -> Result<Loaded, DeviceError> {
    match (cuda, cpu) {
        (Some(cuda), _) => {
            let w = weights
                .w
                .iter()
                .map(|w| cuda.stream.clone_htod(w))
                .collect::<Result<Vec<_>, _>>()?;
            let b = weights
                .b
                .iter()
                .map(|b| cuda.stream.clone_htod(b))
                .collect::<Result<Vec<_>, _>>()?;
            cuda.stream.synchronize()?;
            Ok(Loaded::Cuda {
                spec: weights.spec,
                w,
                b,
                cuda: Arc::clone(cuda),
            })
        }
        (None, Some(vram)) => {
            let held = vram.alloc(weights.bytes())?;
            Ok(Loaded::Cpu {
                weights: Arc::new(weights),
                _held: held,
                vram: vram.clone(),
            })
        }
        (None, None) => Err(DeviceError::Driver("no device to load onto".into())),
    }
}

impl Loaded {
    /// Device name for responses.
    pub fn device(&self) -> &'static str {
        match self {
            Loaded::Cpu { .. } => "cpu",
            Loaded::Cuda { .. } => "cuda",
        }
    }

    /// Run a forward pass over `x` (`batch × dim`), holding `workspace` extra device bytes for
    /// its duration (activations and caches of a real model).
    pub fn forward(&self, x: &[f32], workspace: u64) -> Result<Vec<f32>, DeviceError> {
        match self {
            Loaded::Cpu { weights, vram, .. } => {
                let activations = (x.len() as u64) * 4 * 2;
                let _scratch = vram.alloc(workspace + activations)?;
                Ok(forward_cpu(weights, x))
            }
            Loaded::Cuda { spec, w, b, cuda } => {
                let s = &cuda.stream;
                let _scratch = s.alloc_zeros::<u8>(workspace as usize)?;
                let mut cur = s.clone_htod(x)?;
                let mut next = s.alloc_zeros::<f32>(x.len())?;
                let n = u32::try_from(x.len())
                    .map_err(|_| DeviceError::Driver("batch too large".into()))?;
                let d = spec.dim as u32;
                for (wl, bl) in w.iter().zip(b) {
                    let mut launch = s.launch_builder(&cuda.kernel);
                    launch
                        .arg(wl)
                        .arg(bl)
                        .arg(&cur)
                        .arg(&mut next)
                        .arg(&d)
                        .arg(&n);
                    // SAFETY: the kernel's parameters are (w, bias, x, y, d, n) as passed; every
                    // buffer holds at least the elements the kernel indexes (n = batch·d).
                    unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }?;
                    std::mem::swap(&mut cur, &mut next);
                }
                Ok(s.clone_dtoh(&cur)?)
            }
        }
    }
}
