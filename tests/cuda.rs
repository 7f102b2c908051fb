//! CUDA against the CPU, on the same inputs: every parameter's gradient of every model, kiln's
//! CUDA kernels one by one, and whole optimizer steps. candle has shipped wrong conv weight
//! gradients on non-CPU backends; this is where such a thing is caught.
//!
//! Built only with `--features cuda` (a CPU build has no such tests to report as passing), and
//! then it needs a GPU: without one every test fails. CI has no GPU; these run on the GPU
//! machine (README, "Devices, and what was verified where").
#![cfg(feature = "cuda")]

use candle_core::backprop::GradOps;
use candle_core::{DType, Device, Tensor, Var};
use kiln::data::batches::{BatchBuffer, DeviceSet};
use kiln::data::{synthetic, ChannelStats};
use kiln::device::DeviceRequest;
use kiln::models::{self, Task, MODELS};
use kiln::ops::{self, Activation, ConvParams, MemoryFormat, PoolParams};

/// The activations' layouts CUDA runs: channels last is the ResNets' default there.
const FORMATS: [MemoryFormat; 2] = [MemoryFormat::ChannelsLast, MemoryFormat::ChannelsFirst];

/// Gradients agree within this share of the largest gradient of the parameter: the GPU sums in
/// other orders (and fuses multiply-adds), so bits differ; a wrong gradient is off by far more.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn cuda() -> Device {
    kiln::device::open(DeviceRequest::Cuda(0))
        .unwrap_or_else(|err| panic!("built with the cuda feature, but no GPU answers: {err}"))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("a tensor readable as f32")
}

/// `||cuda - cpu|| <= tolerance * ||cpu||` (L2 norms): for comparisons where a few elements may
/// legitimately differ more, but the whole must not.
fn assert_relative_l2(what: &str, cpu: &Tensor, cuda: &Tensor, tolerance: f64) {
    let (a, b) = (values(cpu), values(cuda));
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    let norm = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let error = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt();
    let relative = error / norm.max(1e-12);
    eprintln!("{what}: relative L2 difference {relative:.2e}");
    assert!(
        relative <= tolerance,
        "{what}: CPU and CUDA differ by {relative:.2e} of the norm (allowed {tolerance:.0e})"
    );
}

/// `cuda` agrees with `cpu` within RELATIVE_TOLERANCE of cpu's largest magnitude.
fn assert_close(what: &str, cpu: &Tensor, cuda: &Tensor) {
    let (a, b) = (values(cpu), values(cuda));
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= RELATIVE_TOLERANCE * scale,
        "{what}: CPU and CUDA differ by {worst} (largest magnitude {scale})"
    );
    eprintln!("{what}: worst difference {:.2e} of {scale:.2e}", worst);
}

/// Small widths where the maths is the same: a ResNet of width 8 on CIFAR-sized images, its
/// activations in `format`.
fn architecture(spec: &models::ModelSpec, format: MemoryFormat) -> models::Architecture {
    let width = if spec.name.starts_with("resnet") {
        8
    } else {
        64
    };
    let mut arch =
        models::Architecture::new(10, 32, models::Stem::Cifar, width).expect("a valid shape");
    arch.memory_format = Some(format);
    arch
}

/// A model's loss on a fixed batch, on `device`, and its gradients by parameter name; the
/// images cast to `dtype` (the training loop's precision), the activations in `format`.
fn gradients(
    spec: &models::ModelSpec,
    device: &Device,
    dtype: DType,
    format: MemoryFormat,
) -> Vec<(String, Tensor)> {
    let arch = architecture(spec, format);
    let built = models::build(spec, &arch, 7, device).expect("the model builds");
    // Deep ResNets at their initialisation are chaotic in f32 (a one-in-a-million change of the
    // input moves PyTorch's own gradients by 3%, tests/fixtures/README.md): each residual
    // branch's last BatchNorm scaled down makes the comparison one of the maths, not of rounding.
    for (name, var) in built.params.vars() {
        let last_norm = name.ends_with(".bn3.weight")
            || (name.ends_with(".bn2.weight") && !spec.name.ends_with("50"));
        if spec.name.starts_with("resnet") && last_norm && name.starts_with("layer") {
            var.set(&(var.as_tensor() * 0.1).unwrap()).unwrap();
        }
    }
    let loss = match spec.task {
        Task::ImageClassification => {
            let set = DeviceSet::new(synthetic::generate(48, 3), ChannelStats::CIFAR10, device)
                .expect("data fits");
            let order = set.order(&(0..48).rev().collect::<Vec<_>>()).unwrap();
            let mut buffer = BatchBuffer::default();
            let (images, labels) = set.batch(&order, 0..48, &mut buffer, None).unwrap();
            let images = images.to_dtype(dtype).unwrap();
            let logits = built.module.forward_t(&images, true).unwrap();
            ops::cross_entropy(&logits, &labels, 0.1).unwrap()
        }
        Task::LinearFit => {
            let x = Tensor::arange(0f32, 32.0, &Device::Cpu)
                .and_then(|x| (x / 16.0)?.reshape((32, 1))?.to_device(device))
                .unwrap();
            let y = x.affine(3.0, 2.0).unwrap();
            let prediction = built.module.forward_t(&x, true).unwrap();
            (prediction - y).unwrap().sqr().unwrap().mean_all().unwrap()
        }
    };
    let grads = loss
        .clone()
        .backward_consuming_with(&ops::GradKernels)
        .expect("backward runs");
    built
        .params
        .vars()
        .into_iter()
        .map(|(name, var)| {
            let grad = grads
                .get(&var)
                .expect("every parameter has a gradient")
                .clone();
            (name, grad)
        })
        .collect()
}

#[test]
fn every_parameter_gradient_of_every_model_matches_the_cpu() {
    let gpu = cuda();
    for (spec, format) in MODELS.iter().flat_map(|m| FORMATS.map(|f| (m, f))) {
        let on_cpu = gradients(spec, &Device::Cpu, DType::F32, MemoryFormat::ChannelsFirst);
        let on_gpu = gradients(spec, &gpu, DType::F32, format);
        assert_eq!(on_cpu.len(), on_gpu.len());
        for ((name, a), (_, b)) in on_cpu.iter().zip(&on_gpu) {
            let what = format!("{} {format:?} {name} gradient", spec.name);
            // ResNet-50's 50 layers at initialisation amplify the difference between the CPU's
            // rounding (Winograd for its 3x3 convolutions) and cuDNN's (whose algorithms are
            // chosen by timing, run to run) to 0.1-0.4% of a parameter's largest gradient
            // (measured on an H100): held as a whole instead, in the L2 norm, where a wrong
            // gradient is off by tens of percent.
            if spec.name == "resnet50" {
                assert_relative_l2(&what, a, b, 1e-2);
            } else if spec.name == "fastnet" {
                // Max-pooling sends each window's gradient to one pixel: where two are equal
                // within rounding, the CPU's and cuDNN's rounding pick different ones (4e-3 of
                // a weight gradient's norm on an H200), and the whitening bias's gradient sums
                // 46,000 terms that largely cancel.
                assert_relative_l2(&what, a, b, 1e-2);
            } else {
                assert_close(&what, a, b);
            }
        }
    }
}

/// bf16 and f16 activations on the GPU (kiln's BatchNorm and add-ReLU kernels, cuDNN's
/// half-precision convolutions) against f32 on the CPU: every gradient comes back f32 and points
/// the same way.
#[test]
fn resnet_gradients_in_bf16_and_f16_on_the_gpu_are_close_to_the_cpus_f32() {
    let gpu = cuda();
    let resnets = MODELS.iter().filter(|spec| spec.mixed_precision);
    for (spec, format) in resnets.flat_map(|m| FORMATS.map(|f| (m, f))) {
        let on_cpu = gradients(spec, &Device::Cpu, DType::F32, MemoryFormat::ChannelsFirst);
        for half in [DType::BF16, DType::F16] {
            let on_gpu = gradients(spec, &gpu, half, format);
            let (mut dot, mut cpu_norm, mut gpu_norm) = (0f64, 0f64, 0f64);
            for ((name, a), (_, b)) in on_cpu.iter().zip(&on_gpu) {
                assert_eq!(
                    b.dtype(),
                    DType::F32,
                    "{} {half:?} {name}: master gradients are f32",
                    spec.name
                );
                let (mut off, mut own) = (0f64, 0f64);
                for (x, y) in values(a).iter().zip(values(b)) {
                    dot += f64::from(*x) * f64::from(y);
                    cpu_norm += f64::from(*x) * f64::from(*x);
                    gpu_norm += f64::from(y) * f64::from(y);
                    off += (f64::from(*x) - f64::from(y)).powi(2);
                    own += f64::from(*x) * f64::from(*x);
                }
                // Each parameter on its own too (as models' CPU test: bf16 leaves a BatchNorm
                // bias's gradient up to about 28% from f32's; a wrong one is 100% off).
                let relative = (off / own.max(1e-24)).sqrt();
                assert!(
                    relative < 0.5,
                    "{} {format:?} {half:?} {name}: gradient {relative:.3} (relative L2) from f32's",
                    spec.name
                );
            }
            let cosine = dot / (cpu_norm.sqrt() * gpu_norm.sqrt());
            eprintln!(
                "{} {format:?} {half:?} gradients: cosine similarity {cosine:.5} to f32",
                spec.name
            );
            assert!(
                cosine > 0.99,
                "{} {format:?} {half:?}: cosine similarity {cosine}",
                spec.name
            );
        }
    }
}

#[test]
fn batches_gathered_on_the_gpu_are_the_cpus_bit_for_bit() {
    let gpu = cuda();
    let set = synthetic::generate(40, 1);
    // A full batch, then a shorter one written over it in the same buffer.
    let batch = |device: &Device| {
        let on_device = DeviceSet::new(set.clone(), ChannelStats::CIFAR10, device).unwrap();
        let order = on_device.order(&[39, 0, 17, 17, 5, 21]).unwrap();
        let mut buffer = BatchBuffer::default();
        let (first, _) = on_device.batch(&order, 1..5, &mut buffer, None).unwrap();
        let first = values(&first);
        let (x, y) = on_device.batch(&order, 4..6, &mut buffer, None).unwrap();
        (first, values(&x), y.to_vec1::<u32>().unwrap())
    };
    assert_eq!(batch(&Device::Cpu), batch(&gpu));
}

#[test]
fn augmented_batches_on_the_gpu_are_the_cpus_bit_for_bit() {
    let gpu = cuda();
    let set = synthetic::generate(40, 1);
    let alternate = |turned| Some(kiln::ops::gather::AlternateFlip { key: 77, turned });
    let cases = [
        (4, false, 0, None, None),
        (4, true, 8, None, None),
        (0, false, 5, None, None),
        (31, true, 32, None, None),
        (0, false, 0, Some([0.08, 1.0]), None),
        (0, false, 6, Some([0.5, 0.9]), None),
        (2, true, 0, None, alternate(false)),
        (2, true, 0, None, alternate(true)),
    ];
    for (padding, reflect, cutout, resized_crop, alternate_flip) in cases {
        let augment = kiln::ops::Augmentation {
            key: 12345 + padding as u64 + cutout as u64,
            width: 32,
            crop_padding: padding,
            reflect,
            flip: true,
            alternate_flip,
            cutout,
            resized_crop,
            positions: kiln::ops::Positions::WHOLE,
        };
        let batch = |device: &Device| {
            let on_device = DeviceSet::new(set.clone(), ChannelStats::CIFAR10, device).unwrap();
            let order = on_device.order(&(0..40).rev().collect::<Vec<_>>()).unwrap();
            let mut buffer = BatchBuffer::default();
            let (x, _) = on_device
                .batch(&order, 3..37, &mut buffer, Some(&augment))
                .unwrap();
            values(&x)
        };
        assert!(batch(&Device::Cpu) == batch(&gpu), "{augment:?}");
    }
}

/// BatchNorm (training, its activation fused) then add-ReLU on `device` with the data in `dtype` (parameters f32)
/// and `format`: output, mean, variance, and the gradients of x, gamma and beta, as f32 and
/// channels first.
fn batch_norm_and_add_relu(
    shape: [usize; 4],
    act: Activation,
    dtype: DType,
    format: MemoryFormat,
    device: &Device,
) -> Vec<Tensor> {
    // Inputs bf16 values whatever `dtype`, so that the f32 and bf16 runs read the same numbers
    // and only the arithmetic differs; the same values in either format.
    let input = |shape: &[usize], seed| {
        let t = ops_input(shape, seed).to_dtype(DType::BF16).unwrap();
        let t = t.to_dtype(dtype).unwrap().to_device(device).unwrap();
        format.from_nchw(&t).unwrap()
    };
    let x = Var::from_tensor(&input(&shape, 1)).unwrap();
    let gamma = Var::from_tensor(&ops_input(&[shape[1]], 2).to_device(device).unwrap()).unwrap();
    let beta = Var::from_tensor(&ops_input(&[shape[1]], 3).to_device(device).unwrap()).unwrap();
    let out = ops::batch_norm_train(
        x.as_tensor(),
        gamma.as_tensor(),
        beta.as_tensor(),
        1e-5,
        act,
        format,
    )
    .unwrap();
    assert_eq!(out.y.dtype(), dtype, "the output keeps the data's type");
    let y = ops::add_relu(&out.y, &input(&shape, 4)).unwrap();
    let upstream = input(&shape, 5);
    let grads = (&y * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |v: &Var| grads.get(v).unwrap().clone();
    let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let nchw = |t: Tensor| format.to_nchw(&t).unwrap();
    [
        nchw(y),
        out.mean,
        out.var,
        nchw(grad(&x)),
        grad(&gamma),
        grad(&beta),
    ]
    .into_iter()
    .map(f32s)
    .collect()
}

const BN_CASES: [([usize; 4], Activation); 5] = [
    ([6, 128, 4, 4], Activation::Relu),
    ([13, 3, 7, 5], Activation::Identity),
    ([64, 16, 32, 32], Activation::Relu),
    ([9, 64, 5, 5], Activation::Gelu),
    ([7, 5, 6, 3], Activation::Gelu),
];

const BN_FIGURES: [&str; 6] = [
    "output",
    "mean",
    "variance",
    "input grad",
    "gamma grad",
    "beta grad",
];

#[test]
fn batch_norm_and_add_relu_match_the_cpu() {
    let gpu = cuda();
    let first = MemoryFormat::ChannelsFirst;
    for ((shape, act), format) in BN_CASES.iter().flat_map(|c| FORMATS.map(|f| (*c, f))) {
        let on_cpu = batch_norm_and_add_relu(shape, act, DType::F32, first, &Device::Cpu);
        let on_gpu = batch_norm_and_add_relu(shape, act, DType::F32, format, &gpu);
        for (name, (a, b)) in BN_FIGURES.iter().zip(on_cpu.iter().zip(&on_gpu)) {
            assert_close(&format!("{shape:?} {format:?} {act:?} {name}"), a, b);
        }
    }
}

/// The bf16 and f16 kernels against the CPU's reference composition in the same type (f32
/// arithmetic, results rounded to the half type, as the kernels do), on the same inputs, in the
/// L2 norm: where the two round an output to neighbouring half values, a ReLU after it may pass
/// or stop a whole gradient, so single elements may differ by their size, the whole by well under
/// 1% (measured in bf16: the rest agree to the bit).
#[test]
fn batch_norm_and_add_relu_in_bf16_and_f16_are_close_to_the_cpu() {
    let gpu = cuda();
    let first = MemoryFormat::ChannelsFirst;
    for ((shape, act), format) in BN_CASES.iter().flat_map(|c| FORMATS.map(|f| (*c, f))) {
        for half in [DType::BF16, DType::F16] {
            let on_cpu = batch_norm_and_add_relu(shape, act, half, first, &Device::Cpu);
            let on_gpu = batch_norm_and_add_relu(shape, act, half, format, &gpu);
            for (name, (a, b)) in BN_FIGURES.iter().zip(on_cpu.iter().zip(&on_gpu)) {
                let what = format!("{shape:?} {format:?} {act:?} {half:?} {name}");
                assert_relative_l2(&what, a, b, 1e-2);
            }
        }
    }
}

/// Evaluation-mode BatchNorm (one kernel on CUDA) against the CPU's composition: every
/// activation, both formats; f32 closely, bf16 and f16 within their rounding.
#[test]
fn batch_norm_in_evaluation_mode_matches_the_cpu() {
    let gpu = cuda();
    let shape = [5, 24, 6, 7];
    let c = shape[1];
    let x = ops_input(&shape, 41).to_dtype(DType::BF16).unwrap();
    let var = (ops_input(&[c], 45).abs().unwrap() + 0.5).unwrap();
    let figures = [
        ops_input(&[c], 42),
        ops_input(&[c], 43),
        ops_input(&[c], 44),
        var,
    ];
    for act in [Activation::Identity, Activation::Relu, Activation::Gelu] {
        for format in FORMATS {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let run = |device: &Device, format: MemoryFormat| {
                    let input = x.to_dtype(dtype).unwrap().to_device(device).unwrap();
                    let f: Vec<Tensor> = figures
                        .iter()
                        .map(|t| t.to_device(device).unwrap())
                        .collect();
                    let y = ops::batch_norm_eval(
                        &format.from_nchw(&input).unwrap(),
                        &f[0],
                        &f[1],
                        &f[2],
                        &f[3],
                        1e-5,
                        act,
                        format,
                    )
                    .unwrap();
                    assert_eq!(y.dtype(), dtype, "the output keeps the data's type");
                    format.to_nchw(&y).unwrap().to_dtype(DType::F32).unwrap()
                };
                let on_cpu = run(&Device::Cpu, MemoryFormat::ChannelsFirst);
                let on_gpu = run(&gpu, format);
                let what = format!("{act:?} {format:?} {dtype:?}");
                if dtype == DType::F32 {
                    assert_close(&what, &on_cpu, &on_gpu);
                } else {
                    assert_relative_l2(&what, &on_cpu, &on_gpu, 1e-2);
                }
            }
        }
    }
}

/// A channels-last convolution's bias on CUDA (kiln's `bias_last`: eight channels a thread where
/// their count is a multiple of 8, one otherwise) and the bias's gradient, against the CPU's
/// channels-first convolution with bias.
#[test]
fn channels_last_bias_and_its_gradient_match_the_cpu() {
    let gpu = cuda();
    let p = ConvParams {
        stride: 1,
        padding: 0,
    };
    for co in [24, 5] {
        let (x, w, b) = (
            ops_input(&[3, 4, 6, 5], 61),
            ops_input(&[co, 4, 2, 2], 62),
            ops_input(&[co], 63),
        );
        let r = ops_input(&[3, co, 5, 4], 64);
        let run = |device: &Device, format: MemoryFormat| {
            let bias = Var::from_tensor(&b.to_device(device).unwrap()).unwrap();
            let (x, w) = (x.to_device(device).unwrap(), w.to_device(device).unwrap());
            let y = match format {
                MemoryFormat::ChannelsFirst => ops::conv2d(&x, &w, Some(bias.as_tensor()), p),
                MemoryFormat::ChannelsLast => ops::conv2d_channels_last(
                    &format.from_nchw(&x).unwrap(),
                    &w,
                    Some(bias.as_tensor()),
                    p,
                ),
            }
            .unwrap();
            let y = format.to_nchw(&y).unwrap();
            let grads = (&y * r.to_device(device).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = grads.get(&bias).unwrap().to_device(&Device::Cpu).unwrap();
            (y.to_device(&Device::Cpu).unwrap(), grad)
        };
        let (y, grad) = run(&Device::Cpu, MemoryFormat::ChannelsFirst);
        let (gy, ggrad) = run(&gpu, MemoryFormat::ChannelsLast);
        assert_close(&format!("{co} channels: output"), &y, &gy);
        assert_close(&format!("{co} channels: bias gradient"), &grad, &ggrad);
    }
}

/// What `ops::prepare` loads ahead of the first step (kiln's module, candle's modules by one of
/// their kernels' names, cuDNN's handle) exists under the names it asks for: a candle release
/// that renamed a kernel fails here rather than in a warning at the start of each run.
#[test]
fn preparing_the_gpu_finds_every_module_it_names() {
    ops::prepare(&cuda()).unwrap();
}

/// The warm-up the train binary runs beside the data's loading makes every convolution plan
/// that training and its (test-time augmented) evaluations need: in a `--trace` of a short
/// fastnet run, cuDNN makes plans on the warm-up's thread, and none on the thread that trains.
#[cfg(feature = "cudnn")]
#[test]
fn the_warm_up_leaves_no_convolution_plan_to_the_run() {
    let dir = std::env::temp_dir().join(format!("kiln-warm-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.json");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_train"))
        .args([
            "--model",
            "fastnet",
            "--dataset",
            "synthetic",
            "--device",
            "cuda",
        ])
        .args([
            "--epochs",
            "2",
            "--batch-size",
            "500",
            "--quiet",
            "--models-dir",
        ])
        .arg(dir.join("models"))
        .arg("--trace")
        .arg(&trace)
        .status()
        .unwrap();
    assert!(status.success(), "train failed: {status}");
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let thread_of = |span: &str| {
        events
            .iter()
            .find(|e| e["name"] == span && e["ph"] == "B")
            .unwrap_or_else(|| panic!("no {span} span in the trace"))["tid"]
            .clone()
    };
    let (warming, training) = (thread_of("warm up"), thread_of("epoch"));
    assert_ne!(warming, training);
    let plans_on = |thread: &serde_json::Value| {
        events
            .iter()
            .filter(|e| e["name"] == "cudnn plan" && e["ph"] == "B" && e["tid"] == *thread)
            .count()
    };
    // fastnet: 7 convolutions, each forward and backward, in training and in evaluation.
    assert!(
        plans_on(&warming) >= 14,
        "{} plans warmed",
        plans_on(&warming)
    );
    assert_eq!(plans_on(&training), 0, "plans made while training");
}

/// BatchNorm with GELU fused against BatchNorm then kiln's GELU kernels, on the GPU: the fused
/// kernels round to the data's type where the unfused ones store, so every output and gradient
/// is the same to the bit, in training and in evaluation, in each type and format.
#[test]
fn fusing_gelu_into_batch_norm_changes_no_bit() {
    let gpu = cuda();
    let shape = [6, 32, 5, 7];
    let c = shape[1];
    let on_gpu = |t: Tensor| t.to_device(&gpu).unwrap();
    let (gamma, beta, mean) = (
        on_gpu(ops_input(&[c], 52)),
        on_gpu(ops_input(&[c], 53)),
        on_gpu(ops_input(&[c], 54)),
    );
    let var = on_gpu((ops_input(&[c], 55).abs().unwrap() + 0.5).unwrap());
    for format in FORMATS {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let data = |seed| {
                let t = on_gpu(ops_input(&shape, seed).to_dtype(dtype).unwrap());
                format.from_nchw(&t).unwrap()
            };
            let run = |fused: bool| {
                let x = Var::from_tensor(&data(51)).unwrap();
                let (g, b) = (
                    Var::from_tensor(&gamma).unwrap(),
                    Var::from_tensor(&beta).unwrap(),
                );
                let act = if fused {
                    Activation::Gelu
                } else {
                    Activation::Identity
                };
                let finish = |y: Tensor| if fused { y } else { ops::gelu(&y).unwrap() };
                let train = ops::batch_norm_train(
                    x.as_tensor(),
                    g.as_tensor(),
                    b.as_tensor(),
                    1e-5,
                    act,
                    format,
                )
                .unwrap();
                let y = finish(train.y);
                let grads = (&y * &data(56))
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let eval = ops::batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-5, act, format)
                    .unwrap();
                [
                    y,
                    grads.get(&x).unwrap().clone(),
                    grads.get(&g).unwrap().clone(),
                    grads.get(&b).unwrap().clone(),
                    finish(eval),
                ]
                .map(|t| values(&t))
            };
            assert!(run(true) == run(false), "{format:?} {dtype:?}");
        }
    }
}

/// A residual block's end as one node (`batch_norm_add_relu_train`) against BatchNorm then
/// add-ReLU on the GPU (`residual_end_composed`), joined by the input as it is or through its
/// own BatchNorm: output,
/// statistics and gradients to the bit, in each type and format. Then its output feeding two
/// consumers, as a block's feeds the next block's branches: the gradient summed and gated in one
/// pass (`add_gated`) gives the bits of one consumer taking the sum (summed on the CPU).
#[test]
fn the_fused_residual_end_changes_no_bit() {
    let gpu = cuda();
    let shape = [6, 16, 5, 7];
    let c = shape[1];
    let on_gpu = |t: Tensor| t.to_device(&gpu).unwrap();
    let parameters = [72, 73, 76, 77].map(|seed| on_gpu(ops_input(&[c], seed)));
    for format in FORMATS {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let data = |seed| {
                let t = on_gpu(ops_input(&shape, seed).to_dtype(dtype).unwrap());
                format.from_nchw(&t).unwrap()
            };
            for normalised in [false, true] {
                let run = |fused: bool, consumers: usize| {
                    let [g, b, gr, br] = parameters.clone();
                    let mut inputs = vec![data(71), g, b, data(74)];
                    if normalised {
                        inputs.extend([gr, br]);
                    }
                    let vars: Vec<Var> = inputs
                        .iter()
                        .map(|t| Var::from_tensor(t).unwrap())
                        .collect();
                    let v: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
                    let main = ops::NormInputs {
                        x: v[0],
                        gamma: v[1],
                        beta: v[2],
                        eps: 1e-5,
                    };
                    let shortcut = match v[..] {
                        [_, _, _, r, gamma, beta] => ops::Shortcut::Normalised(ops::NormInputs {
                            x: r,
                            gamma,
                            beta,
                            eps: 1e-3,
                        }),
                        _ => ops::Shortcut::Identity(v[3]),
                    };
                    let out = if fused {
                        ops::batch_norm_add_relu_train(main, shortcut, format)
                    } else {
                        ops::batch_norm::residual_end_composed(main, shortcut, format)
                    }
                    .unwrap();
                    let upstream = |seed| (&out.y * &data(seed)).unwrap().sum_all().unwrap();
                    let loss = if consumers == 2 {
                        (upstream(75) + upstream(78)).unwrap()
                    } else {
                        let cpu = |seed| {
                            let t = ops_input(&shape, seed).to_dtype(dtype).unwrap();
                            format.from_nchw(&t).unwrap()
                        };
                        let summed = on_gpu((cpu(75) + cpu(78)).unwrap());
                        (&out.y * &summed).unwrap().sum_all().unwrap()
                    };
                    let grads = loss.backward_consuming_with(&ops::GradKernels).unwrap();
                    let mut results = vec![
                        values(&out.y),
                        values(&out.main.mean),
                        values(&out.main.var),
                    ];
                    if let Some(s) = &out.shortcut {
                        results.extend([values(&s.mean), values(&s.var)]);
                    }
                    results.extend(vars.iter().map(|v| values(grads.get(v).unwrap())));
                    results
                };
                let fused = run(true, 1);
                assert!(
                    fused == run(false, 1),
                    "{format:?} {dtype:?} normalised {normalised}"
                );
                assert!(
                    fused == run(true, 2),
                    "{format:?} {dtype:?} normalised {normalised}: two consumers"
                );
            }
        }
    }
}

#[test]
fn the_fused_block_and_the_loss_match_the_cpu_on_odd_shapes() {
    let gpu = cuda();
    // Stride 2 that does not tile, padding 1, a 3x3 pool over a 5x5 output, 13 images.
    let x = ops_input(&[13, 2, 11, 10], 1);
    let w = ops_input(&[5, 2, 3, 3], 2);
    let b = ops_input(&[5], 3);
    let p = ConvParams {
        stride: 2,
        padding: 1,
    };
    let run = |device: &Device| {
        let (w, b) = (
            Var::from_tensor(&w.to_device(device).unwrap()).unwrap(),
            Var::from_tensor(&b.to_device(device).unwrap()).unwrap(),
        );
        let x = x.to_device(device).unwrap();
        let y = ops::conv_relu_pool(&x, w.as_tensor(), Some(b.as_tensor()), p, 2).unwrap();
        let logits = y.flatten_from(1).unwrap();
        let labels =
            Tensor::from_vec((0..13u32).map(|i| i % 5).collect::<Vec<_>>(), 13, device).unwrap();
        let loss = ops::cross_entropy(&logits, &labels, 0.1).unwrap();
        let tally = ops::batch_tally(&logits, &labels, &loss).unwrap();
        let grads = loss.backward().unwrap();
        [
            y,
            loss,
            tally,
            grads.get(&w).unwrap().clone(),
            grads.get(&b).unwrap().clone(),
        ]
        .map(|t| t.to_device(&Device::Cpu).unwrap())
    };
    let (cpu, cuda) = (run(&Device::Cpu), run(&gpu));
    for (name, (a, b)) in [
        "output",
        "loss",
        "tally",
        "weight gradient",
        "bias gradient",
    ]
    .iter()
    .zip(cpu.iter().zip(&cuda))
    {
        assert_close(name, a, b);
    }
}

/// Each model's optimizer (Adam for SimpleCNN, SGD with momentum for the linear fit), three
/// steps from the CPU's gradients copied to both devices, so only the optimizer differs.
#[test]
fn optimizer_steps_on_the_gpu_give_the_cpus_bits() {
    let gpu = cuda();
    for spec in MODELS {
        let (_, mut config) =
            kiln::config::resolve(Some(spec.name), None, &kiln::config::Overrides::default())
                .unwrap();
        // Every branch of the update: momentum (SGD's buffer starts, then accumulates), decay.
        config.momentum = 0.9;
        config.weight_decay = 0.01;
        let first = MemoryFormat::ChannelsFirst;
        let grads = gradients(spec, &Device::Cpu, DType::F32, first);
        let step = |device: &Device| {
            let built = models::build(spec, &architecture(spec, first), 7, device).unwrap();
            let params = built.params.vars();
            let mut optimizer = kiln::optim::build(&config.optim(), &built.params, 1).unwrap();
            for _ in 0..3 {
                let mut store = candle_core::backprop::GradStore::default();
                for ((_, var), (_, grad)) in params.iter().zip(&grads) {
                    store.insert(var.as_tensor(), grad.to_device(device).unwrap());
                }
                optimizer.step(&store).unwrap();
            }
            let mut bits: Vec<u32> = Vec::new();
            for (_, var) in &params {
                bits.extend(values(var.as_tensor()).iter().map(|v| v.to_bits()));
            }
            for (_, state) in optimizer.state().unwrap() {
                bits.extend(values(&state).iter().map(|v| v.to_bits()));
            }
            bits
        };
        assert_eq!(
            step(&Device::Cpu),
            step(&gpu),
            "{} ({:?})",
            spec.name,
            config.optimizer
        );
    }
}

/// The backward pass's gradient sums (kiln's kernels, `ops::GradKernels`) give the CPU's sums
/// bit for bit, eight at a time or one, f32, bf16 and f16, into a new tensor or written into the
/// held one; and candle's backward pass, given them,
/// adds the gradients of a tensor with two consumers.
#[test]
fn gradient_sums_on_the_gpu_are_the_cpus_bit_for_bit() {
    let gpu = cuda();
    for (shape, dtype) in [
        (&[64, 8, 8, 16][..], DType::F32),
        (&[1001][..], DType::F32),
        (&[64, 8, 8, 16][..], DType::BF16),
        (&[3, 7, 5][..], DType::BF16),
        (&[64, 8, 8, 16][..], DType::F16),
    ] {
        let (a, b) = (
            ops_input(shape, 1).to_dtype(dtype).unwrap(),
            ops_input(shape, 2).to_dtype(dtype).unwrap(),
        );
        let on_cpu = (&a + &b).unwrap();
        let (a, b) = (a.to_device(&gpu).unwrap(), b.to_device(&gpu).unwrap());
        let on_gpu = ops::GradKernels.add(&a, &b).unwrap();
        assert_eq!(values(&on_cpu), values(&on_gpu), "{shape:?} {dtype:?}");
        // The gradients of a residual block's end pass through its ReLU as they are summed.
        let end = Var::from_tensor(&ops_input(shape, 3).to_dtype(dtype).unwrap()).unwrap();
        let y = ops::add_relu(&end.to_device(&gpu).unwrap(), &b).unwrap();
        let gated_on_cpu = on_cpu
            .mul(
                &y.to_device(&Device::Cpu)
                    .unwrap()
                    .gt(0f64)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
        let gated_on_gpu = ops::GradKernels
            .add_gated(&a, &b, &y)
            .unwrap()
            .expect("kiln's kernel takes same-shaped CUDA tensors");
        assert_eq!(
            values(&gated_on_cpu),
            values(&gated_on_gpu),
            "{shape:?} {dtype:?} gated"
        );
        // Both written into the held gradient, as the pass does where the store alone holds it.
        let held = a.copy().unwrap();
        assert!(ops::GradKernels.add_in_place(&held, &b).unwrap());
        assert_eq!(
            values(&on_cpu),
            values(&held),
            "{shape:?} {dtype:?} in place"
        );
        let held = a.copy().unwrap();
        assert!(ops::GradKernels.add_gated_in_place(&held, &b, &y).unwrap());
        assert_eq!(
            values(&gated_on_cpu),
            values(&held),
            "{shape:?} {dtype:?} gated in place"
        );
    }
    let x = Var::from_tensor(&ops_input(&[4096], 3).to_device(&gpu).unwrap()).unwrap();
    let y = (x.as_tensor().sqr().unwrap() + x.as_tensor().affine(3.0, 0.0).unwrap()).unwrap();
    let grads = y
        .sum_all()
        .unwrap()
        .backward_consuming_with(&ops::GradKernels)
        .unwrap();
    let expected = (x.as_tensor().affine(2.0, 3.0)).unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), values(&expected));
}

/// Values uniform in [-1, 1), the same for the same seed.
fn ops_input(shape: &[usize], seed: u64) -> Tensor {
    let count: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..count)
        .map(|_| {
            // xorshift64*: enough for test inputs, no dependency needed.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            r as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// `kiln::ops::conv2d` (or `conv2d_channels_last`, by `format`) on `device` (cuDNN on CUDA with
/// the `cudnn` feature, kiln's kernels on the CPU) with `x` and `w` as parameters in `dtype`:
/// the output, and the input and weight gradients of sum(y * r), all as f32 channels first on
/// the CPU.
fn conv_and_gradients(
    (x, w, r): (&Tensor, &Tensor, &Tensor),
    p: ConvParams,
    dtype: DType,
    format: MemoryFormat,
    device: &Device,
) -> [Tensor; 3] {
    let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(device).unwrap();
    let (x, w) = (
        Var::from_tensor(&format.from_nchw(&on(x)).unwrap()).unwrap(),
        Var::from_tensor(&on(w)).unwrap(),
    );
    let y = match format {
        MemoryFormat::ChannelsFirst => ops::conv2d(x.as_tensor(), w.as_tensor(), None, p),
        MemoryFormat::ChannelsLast => {
            ops::conv2d_channels_last(x.as_tensor(), w.as_tensor(), None, p)
        }
    }
    .unwrap();
    let loss = (&y * format.from_nchw(&on(r)).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    [
        format.to_nchw(&y).unwrap(),
        format.to_nchw(grads.get(&x).unwrap()).unwrap(),
        grads.get(&w).unwrap().clone(),
    ]
    .map(|t| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    })
}

/// (what, x [N, C, H, W], w [CO, C, KH, KW], stride, padding)
type ConvCase = (&'static str, [usize; 4], [usize; 4], usize, usize);

#[rustfmt::skip]
const CONV_CASES: [ConvCase; 7] = [
    ("3x3 s1 p1, 3->64, batch 1, 15x13", [1, 3, 15, 13], [64, 3, 3, 3], 1, 1),
    ("3x3 s2 p1, 64->128, batch 33, 9x11", [33, 64, 9, 11], [128, 64, 3, 3], 2, 1),
    ("3x3 s1 p1, 64->128, batch 33, 8x8", [33, 64, 8, 8], [128, 64, 3, 3], 1, 1),
    ("1x1 s2 p0, 64->128, batch 5, 13x13", [5, 64, 13, 13], [128, 64, 1, 1], 2, 0),
    ("7x7 s2 p3, 3->64, batch 33, 23x21", [33, 3, 23, 21], [64, 3, 7, 7], 2, 3),
    ("1x3 s1 p1, 64->128, batch 3, 7x9", [3, 64, 7, 9], [128, 64, 1, 3], 1, 1),
    ("3x3 s2 p0, 3->64, batch 1, 3x5", [1, 3, 3, 5], [64, 3, 3, 3], 2, 0),
];

/// The inputs of one case: x, w and the output weights r of the loss sum(y * r).
fn conv_case_inputs(case: &ConvCase, seed: u64) -> (Tensor, Tensor, Tensor, ConvParams) {
    let &(_, x, w, stride, padding) = case;
    let out = |size: usize, k: usize| (size + 2 * padding - k) / stride + 1;
    let y = [x[0], w[0], out(x[2], w[2]), out(x[3], w[3])];
    (
        ops_input(&x, seed),
        ops_input(&w, seed + 1),
        ops_input(&y, seed + 2),
        ConvParams { stride, padding },
    )
}

#[test]
fn convolutions_and_their_gradients_match_the_cpu_in_every_shape() {
    let gpu = cuda();
    // f32 with FMA math, not TF32 (cuDNN's convolutions never use it in f32).
    let first = MemoryFormat::ChannelsFirst;
    for (i, case) in CONV_CASES.iter().enumerate() {
        let (x, w, r, p) = conv_case_inputs(case, 10 * i as u64);
        let cpu = conv_and_gradients((&x, &w, &r), p, DType::F32, first, &Device::Cpu);
        // Twice on the GPU in each format: the first call chooses the algorithms, the second
        // reuses them.
        for (format, run) in FORMATS.iter().flat_map(|f| [(*f, "first"), (*f, "second")]) {
            let gpu = conv_and_gradients((&x, &w, &r), p, DType::F32, format, &gpu);
            for (name, (a, b)) in ["output", "input gradient", "weight gradient"]
                .iter()
                .zip(cpu.iter().zip(&gpu))
            {
                assert_close(&format!("{} {format:?} ({run} run) {name}", case.0), a, b);
            }
        }
    }
}

/// bf16 and f16 on the GPU against f32 on the CPU from the same rounded inputs: only the GPU's
/// rounding of its results (8 and 11 bits) separates them.
#[cfg(feature = "cudnn")]
#[test]
fn half_precision_convolutions_are_close_to_the_cpu() {
    let gpu = cuda();
    let first = MemoryFormat::ChannelsFirst;
    for (dtype, format) in [DType::BF16, DType::F16]
        .iter()
        .flat_map(|d| FORMATS.map(|f| (*d, f)))
    {
        for (i, case) in CONV_CASES.iter().enumerate() {
            let (x, w, r, p) = conv_case_inputs(case, 100 + 10 * i as u64);
            let rounded = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let (x, w, r) = (rounded(x), rounded(w), rounded(r));
            let cpu = conv_and_gradients((&x, &w, &r), p, DType::F32, first, &Device::Cpu);
            let gpu = conv_and_gradients((&x, &w, &r), p, dtype, format, &gpu);
            for (name, (a, b)) in ["output", "input gradient", "weight gradient"]
                .iter()
                .zip(cpu.iter().zip(&gpu))
            {
                let (a, b) = (values(a), values(b));
                let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let worst = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                eprintln!(
                    "{} {dtype:?} {format:?} {name}: worst difference {worst:.2e} of {scale:.2e}",
                    case.0
                );
                assert!(
                    worst <= 1e-2 * scale,
                    "{} {dtype:?} {format:?} {name}: CPU and CUDA differ by {worst} (largest {scale})",
                    case.0
                );
            }
        }
    }
}

/// Max-pooling in either format against the CPU's channels-first kernel, on values with many
/// ties (quarters) and sides that leave rows and columns over: fastnet's k x k at stride k, and
/// the ResNet stem's overlapping 3x3 at stride 2 with padding 1 (and a 2x2 at stride 1, where
/// most pixels sit in four windows): the same maxima, and each window's gradient on the same
/// (first) winner, summed in the same order, bit for bit. 16 channels take the eight-channel
/// kernels channels last; 5 the one-value ones.
#[test]
fn max_pooling_on_the_gpu_picks_the_cpus_winners() {
    let gpu = cuda();
    let stem = PoolParams {
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    let dense = PoolParams {
        kernel: 2,
        stride: 1,
        padding: 0,
    };
    for channels in [5, 16] {
        for p in [PoolParams::tiles(2), PoolParams::tiles(3), stem, dense] {
            let shape = [3, channels, 7, 9];
            let x = (ops_input(&shape, 21) * 4.0)
                .unwrap()
                .round()
                .unwrap()
                .affine(0.25, 0.0)
                .unwrap();
            let upstream = |dims: &[usize]| ops_input(dims, 22);
            let run = |device: &Device, format: MemoryFormat| {
                let input =
                    Var::from_tensor(&format.from_nchw(&x.to_device(device).unwrap()).unwrap())
                        .unwrap();
                let y = ops::max_pool::max_pool2d_in(input.as_tensor(), p, format).unwrap();
                let y = format.to_nchw(&y).unwrap();
                let g = upstream(y.dims()).to_device(device).unwrap();
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = format.to_nchw(grads.get(&input).unwrap()).unwrap();
                (values(&y), values(&dx))
            };
            let on_cpu = run(&Device::Cpu, MemoryFormat::ChannelsFirst);
            for format in FORMATS {
                assert!(run(&gpu, format) == on_cpu, "{shape:?} {p:?}, {format:?}");
            }
        }
    }
}

/// GELU's kernels against candle's `gelu_erf` on the CPU: forward and gradient, f32 closely,
/// bf16 and f16 within their rounding.
#[test]
fn gelu_on_the_gpu_matches_the_cpu() {
    // 4,000 values take the eight-a-thread kernels, 111 the one-a-thread ones.
    for shape in [[4, 1000], [3, 37]] {
        gelu_matches_the_cpu(&shape);
    }
}

fn gelu_matches_the_cpu(shape: &[usize]) {
    let gpu = cuda();
    let x = (ops_input(shape, 31) * 4.0).unwrap();
    let g = ops_input(shape, 32);
    let run = |device: &Device, dtype: DType| {
        let input =
            Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(device).unwrap()).unwrap();
        let y = ops::gelu(input.as_tensor()).unwrap();
        let upstream = g.to_dtype(dtype).unwrap().to_device(device).unwrap();
        let grads = (&y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads.get(&input).unwrap().to_dtype(DType::F32).unwrap();
        (y.to_dtype(DType::F32).unwrap(), dx)
    };
    let (y, dx) = run(&Device::Cpu, DType::F32);
    let (gy, gdx) = run(&gpu, DType::F32);
    assert_close(&format!("gelu f32 {shape:?}"), &y, &gy);
    assert_close(&format!("gelu f32 gradient {shape:?}"), &dx, &gdx);
    for half in [DType::BF16, DType::F16] {
        let (hy, hdx) = run(&gpu, half);
        for (what, a, b) in [("output", &y, &hy), ("gradient", &dx, &hdx)] {
            let worst = values(a)
                .iter()
                .zip(values(b))
                .map(|(p, q)| (p - q).abs() / p.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-2,
                "gelu {shape:?} {half:?} {what}: off by {worst}"
            );
        }
    }
}
