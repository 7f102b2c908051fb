//! Training steps per second, kiln against PyTorch, on this machine in one run: one random batch
//! held in memory, each model's recipe from its config (SimpleCNN: Adam lr 1e-3; the ResNets:
//! SGD with Nesterov momentum, weight decay and label smoothing, CIFAR stem), warm-up excluded,
//! the median of several repeats.
//!
//!     cargo bench --bench train_step -- [--model simplecnn|resnet18|resnet50] [--device cpu|cuda]
//!         [--threads N] [--repeats N] [--steps N] [--batches 64,512]
//!         [--precision auto|f32|bf16|f16] [--memory-format first|last] [--side 32|224]
//!         [--keep-graph] [--kiln-only] [--census]
//!
//! `--precision bf16`: kiln's mixed precision (bf16 activations, f32 master weights) against
//! PyTorch's bf16 autocast with channels_last, the fastest eager setting a PyTorch user picks;
//! `f16` the same in f16, both sides with dynamic loss scaling.
//! `--memory-format`: the ResNets' activations channels first or last (default: the device's
//! fastest, channels last on CUDA with cuDNN). `--side`: the images' side (default 32, CIFAR's;
//! from 64 on the ResNets take ImageNet's stem, as torchvision's). `--keep-graph`: the step
//! holds its loss and logits through the backward pass, as a caller of candle's
//! `Tensor::backward` does, so that nothing is freed before it returns (what the freeing saves).
//! `--census`: what the forward graph holds at its end, by op and shape, each memory once, and
//! on CUDA one step's account (the graph at the forward pass's end, the backward pass's peak above
//! the step's start; the CPU prints it always), beside PyTorch's (`pytorch/train_step.py
//! --account`).
//!
//! Peak device memory (CUDA), the CUDA context left out of both: "MiB", the allocator's pool at
//! its fullest over the whole run, cuDNN's algorithm search included (kiln's reserved high
//! watermark, PyTorch's `max_memory_reserved`); "in use", the most held by live tensors during
//! the timed steps (kiln's in-use high watermark, PyTorch's `max_memory_allocated`, both reset
//! after the warm-up). On the CPU, kiln's "in use" is the heap's peak over the timed steps (a
//! counting allocator; weights, optimizer state and the batch included).
//!
//! PyTorch's figures come from pytorch/train_step.py (needs `python3` with torch); without it
//! they are skipped with a message.
//!
//! "kiln host ms": the host's time to queue one step on an idle device (the median of
//! [`HOST_STEPS`], until the step's last launch returns). On a GPU, a step whose host time nears
//! its ms/step waits on the host, not on the GPU's kernels. On the CPU it is the whole step.
//!
//! `KILN_PROFILE_STEPS=N` (CUDA): after the timed repeats, kiln and PyTorch each run N more steps
//! inside a CUDA profiler range, so that `ncu --profile-from-start off` measures steady steps'
//! kernels only (not the warm-up or cuDNN's algorithm timing).

// See Cargo.toml: large tensors are allocated and freed every step. Counted, for the CPU's
// "in use" figure.
#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// mimalloc with a count of the bytes allocated and not yet freed, and their peak: on the CPU,
/// tensors live on this heap, so its peak during the timed steps is what they held at once.
mod heap {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    pub struct Counting;

    fn grew(bytes: usize) {
        let now = LIVE.fetch_add(bytes, Relaxed) + bytes;
        PEAK.fetch_max(now, Relaxed);
    }

    // SAFETY: every call is mimalloc's, with the caller's arguments; the counters only observe.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
            unsafe { mimalloc::MiMalloc.dealloc(p, layout) };
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
            let q = unsafe { mimalloc::MiMalloc.realloc(p, layout, size) };
            if !q.is_null() {
                LIVE.fetch_sub(layout.size(), Relaxed);
                grew(size);
            }
            q
        }
    }

    /// Starts the peak afresh from what is allocated now.
    pub fn reset_peak() {
        PEAK.store(LIVE.load(Relaxed), Relaxed);
    }

    pub fn peak() -> u64 {
        PEAK.load(Relaxed) as u64
    }

    pub fn live() -> u64 {
        LIVE.load(Relaxed) as u64
    }
}

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln::config::{resolve, Overrides, Precision};
use kiln::device::DeviceRequest;
use kiln::ops::{cross_entropy, MemoryFormat};
use kiln::{models, optim};

/// Steps timed for the host's share of a step.
const HOST_STEPS: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

/// Peak memory: the device pool at its fullest, and in use during the timed steps.
struct Memory {
    reserved: Option<u64>,
    in_use: Option<u64>,
}

/// kiln's images/s for each repeat of `steps` steps at `batch`, the peak device memory, and
/// the host's milliseconds to queue one step (median).
fn kiln(
    model: &str,
    device: &Device,
    batch: usize,
    steps: usize,
    repeats: usize,
    (dtype, format): (DType, MemoryFormat),
    (side, keep_graph, census): (usize, bool, bool),
) -> kiln::Result<(Vec<f64>, Memory, f64)> {
    let (spec, config) = resolve(Some(model), None, &Overrides::default())?;
    let mut arch = models::Architecture::new(10, side, models::Stem::Auto, 64)?;
    arch.memory_format = Some(format);
    let built = models::build(spec, &arch, 0, device)?;
    // As the training loop: f16 steps scale the loss.
    let optimizer = optim::build(&config.optim(), &built.params, steps)?;
    let mut optimizer =
        optim::for_precision(optimizer, built.params.vars(), dtype, config.loss_scale);
    let images = Tensor::randn(0f32, 1.0, (batch, 3, side, side), device)?;
    let labels = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect(), batch, device)?;
    if census {
        let logits = built.module.forward_t(&images.to_dtype(dtype)?, true)?;
        print_census(&cross_entropy(
            &logits,
            &labels,
            config.label_smoothing as f32,
        )?);
    }
    // Memory in use now and at its peak since the last reset: the heap on the CPU, the memory
    // pool's tensors on CUDA.
    let live = || match device {
        Device::Cpu => Some(heap::live()),
        _ => kiln::device::memory_in_use(device),
    };
    let peak = || match device {
        Device::Cpu => Some(heap::peak()),
        _ => kiln::device::peak_memory_in_use(device),
    };
    let reset_peak = || {
        heap::reset_peak();
        kiln::device::reset_peak_memory_in_use(device);
    };
    // What one step holds: the forward graph at its end, and the backward pass's peak above the
    // step's start (weights, optimizer state and the batch are there before and after). On
    // CUDA with `--census` only: its extra pass and waits change how the pool grows, and so the
    // pool's peak.
    if live().is_some() && (device.is_cpu() || census) {
        // A pass first, so that what is kept from call to call (the CPU convolutions' per-thread
        // scratch, cuDNN's chosen plans) is there before the count starts and left out of it.
        let logits = built.module.forward_t(&images.to_dtype(dtype)?, true)?;
        let loss = cross_entropy(&logits, &labels, config.label_smoothing as f32)?;
        drop((logits, optimizer.backward(loss)?));
        device.synchronize()?;
        let start = live().unwrap_or(0);
        let logits = built.module.forward_t(&images.to_dtype(dtype)?, true)?;
        let loss = cross_entropy(&logits, &labels, config.label_smoothing as f32)?;
        device.synchronize()?;
        let graph = live().unwrap_or(0).saturating_sub(start);
        reset_peak();
        let held = keep_graph.then(|| (logits.clone(), loss.clone()));
        drop(logits);
        let grads = optimizer.backward(loss)?;
        device.synchronize()?;
        let backward = peak().unwrap_or(0).saturating_sub(start);
        drop((held, grads));
        eprintln!(
            "batch {batch}: the forward graph holds {} MiB at its end; the backward pass peaks {} MiB above the step's start",
            mib(Some(graph)),
            mib(Some(backward))
        );
    }
    let mut step = || -> kiln::Result<()> {
        let logits = built.module.forward_t(&images.to_dtype(dtype)?, true)?;
        let loss = cross_entropy(&logits, &labels, config.label_smoothing as f32)?;
        let held = keep_graph.then(|| (logits.clone(), loss.clone()));
        drop(logits);
        let mut grads = optimizer.backward(loss)?;
        drop(held);
        if optimizer.unscale(&mut grads)? {
            optimizer.step(&grads)?;
        }
        Ok(())
    };
    for _ in 0..(steps / 10).max(2) {
        step()?;
    }
    device.synchronize()?;
    reset_peak();
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        for _ in 0..steps {
            step()?;
        }
        // Queued GPU work counts: the clock stops when it is done.
        device.synchronize()?;
        rates.push((steps * batch) as f64 / start.elapsed().as_secs_f64());
    }
    // The host's share: steps queued on an idle device, timed until the last launch returns.
    let mut host_ms = Vec::new();
    for _ in 0..HOST_STEPS {
        device.synchronize()?;
        let start = Instant::now();
        step()?;
        host_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    device.synchronize()?;
    let profiled: usize = std::env::var("KILN_PROFILE_STEPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if profiled > 0 && device.is_cuda() {
        profiler_range(true);
        for _ in 0..profiled {
            step()?;
        }
        device.synchronize()?;
        profiler_range(false);
    }
    let memory = Memory {
        reserved: kiln::device::peak_memory(device),
        in_use: peak(),
    };
    Ok((rates, memory, median(host_ms)))
}

/// Starts or stops the CUDA profiler's collection (what `ncu --profile-from-start off` waits for).
#[cfg(feature = "cuda")]
fn profiler_range(on: bool) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: neither call takes arguments; they switch collection on the current context, which
    // candle made current on this thread when it opened the device.
    let _ = unsafe {
        if on {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
}

#[cfg(not(feature = "cuda"))]
fn profiler_range(_: bool) {}

/// PyTorch's images/s for each repeat and its peak device memory, or why there are none;
/// `account`: its one-step account too (`--census`).
fn pytorch(
    model: &str,
    device: DeviceRequest,
    (batch, side, account): (usize, usize, bool),
    steps: usize,
    repeats: usize,
    threads: usize,
    precision: Precision,
) -> Result<(Vec<f64>, Memory), String> {
    // From the working directory when it is a checkout (a binary carried to a GPU machine runs
    // there), else from the one this was built in.
    let script = [
        "pytorch/train_step.py",
        concat!(env!("CARGO_MANIFEST_DIR"), "/pytorch/train_step.py"),
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .ok_or("pytorch/train_step.py not found")?;
    let out = Command::new("python3")
        .args([script, "--model", model, "--batch", &batch.to_string()])
        .args(["--side", &side.to_string()])
        .args(["--steps", &steps.to_string()])
        .args(["--repeats", &repeats.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--device", &device.to_string()])
        .args(["--precision", &precision.to_string()])
        .args(account.then_some("--account"))
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("failed").to_string());
    }
    // Its own step breakdown, beside kiln's.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if line.starts_with("batch ") {
            eprintln!("PyTorch {line}");
        }
    }
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let rates = serde_json::from_value(line["images_per_s"].clone()).map_err(|e| e.to_string())?;
    let memory = Memory {
        reserved: line["peak_device_bytes"].as_u64(),
        in_use: line["peak_in_use_bytes"].as_u64(),
    };
    Ok((rates, memory))
}

/// `--census`: what the forward graph behind `loss` holds, by the op that made each tensor and
/// its shape, each memory once, the parameters left out: to set beside what PyTorch's autograd
/// saves (`pytorch/train_step.py --saved`). Tensors that no op made from a parameter (the batch)
/// are not nodes of the graph and are left out too.
fn print_census(loss: &Tensor) {
    let mut seen = std::collections::HashSet::new();
    let mut rows = std::collections::BTreeMap::<(String, Vec<usize>, String), (usize, u64)>::new();
    for t in loss.sorted_nodes() {
        let Some(op) = t.op_name() else { continue };
        let memory = {
            let (storage, _) = t.storage_and_layout();
            std::ptr::from_ref(&*storage).addr()
        };
        if !seen.insert(memory) {
            continue;
        }
        let row = rows.entry((op, t.dims().to_vec(), t.dtype().as_str().to_string()));
        let row = row.or_default();
        row.0 += 1;
        row.1 += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    }
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_by_key(|(_, (_, bytes))| std::cmp::Reverse(*bytes));
    println!("the forward graph at its end, by op and shape (count, MiB):");
    for ((op, dims, dtype), (count, bytes)) in &rows {
        println!(
            "  {op:<28} {dims:?} {dtype}: {count} x = {}",
            mib(Some(*bytes))
        );
    }
    let total = rows.iter().map(|(_, (_, bytes))| bytes).sum::<u64>();
    println!("  total: {} MiB", mib(Some(total)));
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".to_string(), |b| {
        format!("{:.1}", b as f64 / (1 << 20) as f64)
    })
}

fn main() {
    // RUST_LOG=kiln=debug shows, among others, each cuDNN algorithm tried and chosen.
    let _no_trace = kiln::cli::init_logging(None);
    let threads = arg("--threads")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let request: DeviceRequest = arg("--device").unwrap_or(DeviceRequest::Cpu);
    // Before candle or rayon start their thread pools, as the binaries do.
    kiln::device::prepare_cpu_threads(Some(threads));
    let device = match kiln::device::open(request) {
        Ok(device) => device,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    };
    let repeats = arg("--repeats").unwrap_or(5);
    let model: String = arg("--model").unwrap_or_else(|| "simplecnn".to_string());
    let precision: Precision = arg("--precision").unwrap_or_default();
    // `auto` as training resolves it, so that both sides run the same arithmetic.
    let mixed = models::find(&model).is_ok_and(|spec| spec.mixed_precision);
    let dtype = precision.activations(mixed, device.is_cuda());
    let precision = match dtype {
        DType::BF16 => Precision::Bf16,
        DType::F16 => Precision::F16,
        _ => Precision::F32,
    };
    let format = match arg::<String>("--memory-format").as_deref() {
        None => MemoryFormat::preferred(&device),
        Some("first") => MemoryFormat::ChannelsFirst,
        Some("last") => MemoryFormat::ChannelsLast,
        Some(other) => {
            eprintln!("error: --memory-format takes first or last, not {other}");
            std::process::exit(2);
        }
    };
    let side: usize = arg("--side").unwrap_or(32);
    let flag = |name: &str| std::env::args().any(|a| a == name);
    let (keep_graph, kiln_only) = (flag("--keep-graph"), flag("--kiln-only"));
    let census = flag("--census");
    let on_gpu = !device.is_cpu();
    println!(
        "{model} training step, {side}x{side} images{} on {}",
        if keep_graph {
            ", graph kept through backward"
        } else {
            ""
        },
        kiln::device::describe(&device)
    );
    println!(
        "(its config's recipe, {precision}, {format:?}, random batch on the device), median of {repeats} repeats"
    );
    println!(
        "{:>6} {:>7} {:>12} {:>9} {:>14} {:>9} {:>8} {:>10} {:>10} {:>12} {:>13} {:>13}",
        "batch",
        "steps",
        "kiln img/s",
        "ms/step",
        "pytorch img/s",
        "ms/step",
        "ratio",
        "kiln MiB",
        "torch MiB",
        "kiln in use",
        "torch in use",
        "kiln host ms"
    );
    // At least 1000 timed steps on a GPU where small batches take well under a millisecond; a
    // ResNet step on the CPU takes about a second at batch 64.
    let sizes: Vec<(usize, usize)> = match (on_gpu, model == "simplecnn") {
        (true, true) => vec![(64, 2000), (512, 1000)],
        (true, false) => vec![(128, 200), (512, 100)],
        (false, true) => vec![(64, 300), (512, 40)],
        (false, false) => vec![(64, 5)],
    };
    let batches: Option<String> = arg("--batches");
    let sizes: Vec<(usize, usize)> = match batches {
        Some(list) => list
            .split(',')
            .filter_map(|b| b.parse().ok())
            .map(|b| (b, sizes[0].1))
            .collect(),
        None => sizes,
    };
    for (batch, steps) in sizes {
        let steps = arg("--steps").unwrap_or(steps);
        let run = kiln(
            &model,
            &device,
            batch,
            steps,
            repeats,
            (dtype, format),
            (side, keep_graph, census),
        );
        let (ours, our_peak, host) = match run {
            Ok((rates, peak, host)) => (median(rates), peak, host),
            Err(err) => {
                eprintln!("kiln failed at batch {batch}: {err}");
                std::process::exit(1);
            }
        };
        let ms = |rate: f64| 1000.0 * batch as f64 / rate;
        let theirs = match kiln_only {
            true => Err("--kiln-only".to_string()),
            false => pytorch(
                &model,
                request,
                (batch, side, census),
                steps,
                repeats,
                threads,
                precision,
            ),
        };
        match theirs {
            Ok((rates, their_peak)) => {
                let theirs = median(rates);
                println!(
                    "{batch:>6} {steps:>7} {ours:>12.0} {:>9.3} {theirs:>14.0} {:>9.3} {:>7.2}x {:>10} {:>10} {:>12} {:>13} {host:>13.3}",
                    ms(ours),
                    ms(theirs),
                    ours / theirs,
                    mib(our_peak.reserved),
                    mib(their_peak.reserved),
                    mib(our_peak.in_use),
                    mib(their_peak.in_use),
                );
            }
            Err(why) => {
                println!(
                    "{batch:>6} {steps:>7} {ours:>12.0} {:>9.3} {:>14} {:>9} {:>8} {:>10} {:>10} {:>12} {:>13} {host:>13.3}",
                    ms(ours),
                    "-",
                    "-",
                    "-",
                    mib(our_peak.reserved),
                    "-",
                    mib(our_peak.in_use),
                    "-"
                );
                eprintln!("PyTorch reference skipped: {why}");
            }
        }
    }
}
