//! Which device to train on: `--device auto|cpu|cuda[:N]|metal[:N]`.
//!
//! `auto` tries Metal, then CUDA, then the CPU. An explicit request is honoured or refused with
//! a reason; it never falls back silently.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceRequest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match lower.split_once(':') {
            Some((kind, n)) => {
                let n = n
                    .parse::<usize>()
                    .map_err(|_| Error::BadDeviceName(s.to_string()))?;
                (kind, Some(n))
            }
            None => (lower.as_str(), None),
        };
        match (kind, ordinal) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda", n) => Ok(Self::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Self::Metal(n.unwrap_or(0))),
            _ => Err(Error::BadDeviceName(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

/// Opens the requested device.
pub fn open(request: DeviceRequest) -> Result<Device> {
    open_for_rank(request, 0)
}

/// Opens the device a process of a data-parallel run takes: with several processes on a
/// machine each its own GPU, the one of its local rank (`cuda` and `cuda:0` alike, and `auto`
/// once Metal is ruled out); CPU, Metal and other CUDA requests as they are.
pub fn open_for_rank(request: DeviceRequest, local_rank: usize) -> Result<Device> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Cuda(0) => open_cuda(local_rank),
        DeviceRequest::Cuda(n) => open_cuda(n),
        DeviceRequest::Metal(n) => open_metal(n),
        DeviceRequest::Auto => Ok(open_metal(0)
            .or_else(|_| open_cuda(local_rank))
            .unwrap_or(Device::Cpu)),
    }
}

/// Runs a backend's device constructor with its panics contained: a panic inside it (candle
/// has shipped some, see `open_metal`) becomes an error with the panic's message, and the
/// default hook does not print it.
fn contained<T>(open: impl FnOnce() -> candle_core::Result<T>) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open));
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(err)) => Err(err.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .map_or("the backend panicked".to_string(), |m| {
                format!("the backend panicked: {m}")
            })),
    }
}

fn open_cuda(ordinal: usize) -> Result<Device> {
    let name = format!("cuda:{ordinal}");
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::DeviceNotCompiled {
            device: name,
            feature: "cuda",
        });
    }
    let device = contained(|| Device::new_cuda(ordinal)).map_err(|e| Error::DeviceUnavailable {
        device: name,
        reason: format!("{e} (is an NVIDIA driver installed and `nvidia-smi` working?)"),
    })?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        tune_cuda(cuda);
    }
    Ok(device)
}

/// Settings that cost small kernels most of their time otherwise:
/// - no event per tensor use: cudarc records one for every argument of every launch, to order
///   work across streams; kiln runs everything on one stream, where launch order is enough.
/// - freed memory stays in the allocator's pool, as in PyTorch's caching allocator: by default
///   the driver hands it back at every synchronisation and maps it afresh on the next step.
#[cfg(feature = "cuda")]
fn tune_cuda(cuda: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: called once, right after the device opens, before any tensor exists on it; all of
    // kiln's CUDA work runs on this device's one stream.
    unsafe { cuda.disable_event_tracking() };
    let release_threshold = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    if let Err(err) = set_pool_attribute(cuda, release_threshold, u64::MAX) {
        tracing::warn!("CUDA memory pool left as it was: {err}");
    }
}

/// Sets one of the u64 attributes (byte counts) of the device's memory pool.
#[cfg(feature = "cuda")]
fn set_pool_attribute(
    cuda: &candle_core::CudaDevice,
    attribute: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    mut value: u64,
) -> std::result::Result<(), candle_core::cuda_backend::cudarc::driver::DriverError> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let device = cuda.cuda_stream().context().cu_device();
    // SAFETY: `device` comes from a live context; the attributes callers set take a u64.
    unsafe {
        result::device::get_mem_pool(device).and_then(|pool| {
            result::mem_pool::set_attribute(pool, attribute, (&mut value as *mut u64).cast())
        })
    }
}

fn open_metal(ordinal: usize) -> Result<Device> {
    let name = format!("metal:{ordinal}");
    if !candle_core::utils::metal_is_available() {
        return Err(Error::DeviceNotCompiled {
            device: name,
            feature: "metal",
        });
    }
    let unavailable = |reason: String| Error::DeviceUnavailable {
        device: name.clone(),
        reason,
    };
    // candle 0.11 opens metal:N as element N of MTLCopyAllDevices() with `swap_remove`, which
    // panics past the list's end: asking for metal:1 on a one-GPU Mac, or for any device where
    // that list comes back empty (seen on Apple Silicon, huggingface/candle#3839). Count first.
    #[cfg(kiln_metal)]
    {
        let count = candle_metal_kernels::metal::Device::all().len();
        if ordinal >= count {
            return Err(unavailable(match count {
                0 => "Metal lists no GPU on this machine (MTLCopyAllDevices returned none, and \
                      candle opens Metal devices only from that list)"
                    .to_string(),
                n => format!(
                    "this machine has {n} Metal device(s): metal:0 to metal:{}",
                    n - 1
                ),
            }));
        }
    }
    contained(|| Device::new_metal(ordinal)).map_err(|e| {
        unavailable(format!(
            "{e} (Metal needs a Mac with Apple Silicon or a Metal-capable GPU)"
        ))
    })
}

/// A one-line description for the start of a run, e.g. `cpu (2 threads)` or `cuda:0 (NVIDIA H100)`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let ordinal = cuda.cuda_stream().context().ordinal();
            match cuda.cuda_stream().context().name() {
                Ok(name) => format!("cuda:{ordinal} ({name})"),
                Err(_) => format!("cuda:{ordinal}"),
            }
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => match device.location() {
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            _ => "metal".to_string(),
        },
    }
}

/// candle's setting for how long its barrier pool's idle workers spin.
const CANDLE_SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Prepares the CPU backend's threads, before any tensor work: rayon's pool sized to `threads`
/// (default: candle's choice, or RAYON_NUM_THREADS), and on x86-64 every compute thread set to
/// flush denormal floats to zero. Training drives some softmax outputs and gradients into
/// denormal range, where x86 arithmetic takes a slow path: a SimpleCNN step was seen 25%
/// slower without this. (Elsewhere, no change: not yet measured there.)
pub fn prepare_cpu_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        // candle sizes its matrix multiplies from this variable.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle 0.11 runs large elementwise ops on a second pool whose idle workers spin 25,000
    // rounds before sleeping, on the cores rayon's workers then need for kiln's ops: parking
    // them at once made a SimpleCNN step at batch 64 about 15% faster on two cores. A user's
    // own setting wins.
    if std::env::var_os(CANDLE_SPIN_LIMIT).is_none() {
        std::env::set_var(CANDLE_SPIN_LIMIT, "0");
    }
    keep_freed_memory_mapped();
    flush_denormals();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or_else(candle_core::utils::get_num_threads))
        .start_handler(|_| flush_denormals())
        .build_global();
    if let Err(err) = pool {
        tracing::warn!("rayon's thread pool was already running: {err}");
    }
}

/// mimalloc's `mi_option_purge_delay` (its position in mimalloc.h's `mi_option_t` of mimalloc 3,
/// which the bindings do not name).
const MIMALLOC_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc (the binaries' allocator) never to hand freed memory back to the system. A
/// training step frees and allocates the same large activations each time; returned a second
/// after each free (mimalloc's default), they came back as fresh pages the kernel had to zero (18% of a
/// ResNet-18 CPU step in `clear_page`). Peak memory is unchanged: it is the high-water mark
/// either way. A user's MIMALLOC_PURGE_DELAY wins.
fn keep_freed_memory_mapped() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; any thread may call it at any time.
        unsafe { libmimalloc_sys::mi_option_set(MIMALLOC_PURGE_DELAY, -1) };
    }
}

/// Sets flush-to-zero and denormals-are-zero for the calling thread (x86-64 only).
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)]
    // the intrinsics are deprecated in favour of inline assembly, not unsound
    // SAFETY: only the FTZ (bit 15) and DAZ (bit 6) flags of this thread's MXCSR change.
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

/// The most device memory this process's allocations have held at once (the allocator's pool
/// at its fullest, the CUDA context not included), where the backend tells: CUDA does.
pub fn peak_memory(device: &Device) -> Option<u64> {
    pool_memory(device, PoolMemory::ReservedHigh)
}

/// The most device memory in use by live tensors at once since [`reset_peak_memory_in_use`]
/// (or the start), where the backend tells: what PyTorch calls `max_memory_allocated`. Below
/// [`peak_memory`] by what the pool held free, such as cuDNN's algorithm search's workspaces.
pub fn peak_memory_in_use(device: &Device) -> Option<u64> {
    pool_memory(device, PoolMemory::InUseHigh)
}

/// The device memory in use by live tensors now, where the backend tells (PyTorch's
/// `memory_allocated`).
pub fn memory_in_use(device: &Device) -> Option<u64> {
    pool_memory(device, PoolMemory::InUseNow)
}

/// Starts [`peak_memory_in_use`] afresh from what is in use now (PyTorch's
/// `reset_peak_memory_stats`); [`peak_memory`] keeps counting from the start.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn reset_peak_memory_in_use(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // The high watermark can only be reset to zero (CUDA then restarts it from the memory in
        // use). A failure leaves it counting from the start, which only overstates.
        let _ = set_pool_attribute(
            cuda,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        );
    }
}

/// Which of the CUDA memory pool's figures to read: its high watermarks, or what is in use now.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum PoolMemory {
    ReservedHigh,
    InUseHigh,
    InUseNow,
}

#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn pool_memory(device: &Device, figure: PoolMemory) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            use candle_core::cuda_backend::cudarc::driver::{result, sys};
            let attribute = match figure {
                PoolMemory::ReservedHigh => {
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH
                }
                PoolMemory::InUseHigh => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                PoolMemory::InUseNow => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            };
            let device = cuda.cuda_stream().context().cu_device();
            let mut bytes = 0u64;
            // SAFETY: as in `tune_cuda`; the attribute writes a u64.
            unsafe {
                let pool = result::device::get_mem_pool(device).ok()?;
                result::mem_pool::get_attribute(pool, attribute, (&mut bytes as *mut u64).cast())
                    .ok()?;
            }
            Some(bytes)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option's number is hard-coded: a mimalloc that renumbered its options would read
    /// another option's default here (purge delay: 1000 ms, or -1 once kiln has set it).
    #[test]
    fn the_purge_delay_option_is_mimallocs() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one integer option.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MIMALLOC_PURGE_DELAY) };
        assert!(
            delay == 1000 || delay == -1,
            "option {MIMALLOC_PURGE_DELAY} reads {delay}"
        );
        keep_freed_memory_mapped();
        // SAFETY: as above.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MIMALLOC_PURGE_DELAY) },
            -1
        );
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "auto".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        assert_eq!("CPU".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(3)
        );
        assert_eq!(
            "metal".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Metal(0)
        );
        assert_eq!(
            "metal:1".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Metal(1)
        );
        for request in [
            DeviceRequest::Cpu,
            DeviceRequest::Cuda(2),
            DeviceRequest::Metal(0),
        ] {
            assert_eq!(
                request.to_string().parse::<DeviceRequest>().unwrap(),
                request
            );
        }
    }

    #[test]
    fn rejects_bad_names_with_the_choices() {
        for bad in ["gpu", "cuda:x", "cpu:1", "auto:0", "", "cuda:-1"] {
            let err = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(matches!(err, Error::BadDeviceName(_)), "{bad}: {err}");
            assert!(err.to_string().contains("cuda:N"), "{err}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn denormals_flush_to_zero_once_asked() {
        std::thread::spawn(|| {
            let half = |v: f32| std::hint::black_box(v) / std::hint::black_box(2.0f32);
            assert!(
                half(f32::MIN_POSITIVE) > 0.0,
                "a denormal result by default"
            );
            flush_denormals();
            assert_eq!(half(f32::MIN_POSITIVE), 0.0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_panic_in_a_device_constructor_becomes_an_error() {
        let err = contained(|| -> candle_core::Result<()> {
            let empty: Vec<u8> = Vec::new();
            let mut list = empty;
            list.swap_remove(1);
            Ok(())
        })
        .unwrap_err();
        assert!(
            err.starts_with("the backend panicked: swap_remove index"),
            "{err}"
        );
        assert_eq!(contained(|| Ok(7)), Ok(7));
        // The default hook is back: the next panic elsewhere is reported as usual.
        assert!(std::panic::catch_unwind(|| panic!("later")).is_err());
    }

    #[test]
    fn cpu_always_opens() {
        assert!(open(DeviceRequest::Cpu).unwrap().is_cpu());
        assert!(describe(&Device::Cpu).starts_with("cpu ("));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let err = open(DeviceRequest::Cuda(0)).unwrap_err().to_string();
        assert!(
            err.contains("cargo build --release --features cuda"),
            "{err}"
        );
    }

    #[cfg(not(kiln_metal))]
    #[test]
    fn metal_without_the_feature_says_how_to_build_it() {
        let err = open(DeviceRequest::Metal(0)).unwrap_err().to_string();
        assert!(
            err.contains("cargo build --release --features metal"),
            "{err}"
        );
    }

    #[cfg(not(any(feature = "cuda", kiln_metal)))]
    #[test]
    fn auto_falls_to_cpu_when_no_accelerator_is_built() {
        assert!(open(DeviceRequest::Auto).unwrap().is_cpu());
    }
}
