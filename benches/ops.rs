//! Per-op CPU figures: each of kiln's ops at SimpleCNN's shapes against candle's composition of
//! the same maths (its reference), plus the pieces of a step kiln leaves to candle.
//!
//!     cargo bench --bench ops [-- <name filter>]
//!
//! Threads: RAYON_NUM_THREADS (kiln's ops and candle's share rayon's pool). Whole training
//! steps against PyTorch are `benches/train_step.rs`.

// As the binaries: large tensors are allocated and freed every iteration.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use candle_nn::{Linear, Module};
use criterion::{criterion_group, Criterion, Throughput};
use kiln::config::{resolve, Overrides};
use kiln::ops::conv::conv2d_reference;
use kiln::ops::relu_maxpool::relu_max_pool2d_reference;
use kiln::ops::{self, ConvParams, Normalisation};
use kiln::{models, optim};

const SAME: ConvParams = ConvParams {
    stride: 1,
    padding: 1,
};
const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
const STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("a CPU tensor")
}

fn labels(n: usize) -> Tensor {
    Tensor::from_vec((0..n as u32).map(|i| i % 10).collect(), n, &Device::Cpu)
        .expect("a CPU tensor")
}

/// Conv 3->16 (3x3, padding 1) + bias -> ReLU -> max-pool 2, forward alone and with the weight
/// and bias gradients.
fn conv_block(c: &mut Criterion) {
    for batch in [64, 512] {
        let x = randn(&[batch, 3, 32, 32]);
        let weight =
            Var::from_tensor(&(randn(&[16, 3, 3, 3]) * 0.2).expect("scaled")).expect("a variable");
        let bias = Var::from_tensor(&randn(&[16])).expect("a variable");
        let mut group = c.benchmark_group(format!("conv_relu_pool/batch {batch}"));
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function("kiln forward", |b| {
            b.iter(|| ops::conv_relu_pool(&x, &weight, Some(&bias), SAME, 2).expect("forward"))
        });
        let reference =
            || relu_max_pool2d_reference(&conv2d_reference(&x, &weight, Some(&bias), SAME)?, 2);
        group.bench_function("candle forward", |b| {
            b.iter(|| reference().expect("forward"))
        });
        group.bench_function("kiln forward+backward", |b| {
            b.iter(|| {
                let y = ops::conv_relu_pool(&x, &weight, Some(&bias), SAME, 2).expect("forward");
                y.sum_all().and_then(|s| s.backward()).expect("backward")
            })
        });
        group.bench_function("candle forward+backward", |b| {
            b.iter(|| {
                let y = reference().expect("forward");
                y.sum_all().and_then(|s| s.backward()).expect("backward")
            })
        });
        group.finish();
    }
}

/// SimpleCNN's classifier, Linear(4096, 10): candle's matmul (kiln has no op of its own here).
fn linear(c: &mut Criterion) {
    let x = randn(&[64, 4096]);
    let weight = Var::from_tensor(&(randn(&[10, 4096]) * 0.01).expect("scaled")).expect("var");
    let bias = Var::from_tensor(&randn(&[10])).expect("a variable");
    let fc = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
    let mut group = c.benchmark_group("linear 4096->10/batch 64");
    group.throughput(Throughput::Elements(64));
    group.bench_function("candle forward", |b| {
        b.iter(|| fc.forward(&x).expect("forward"))
    });
    group.bench_function("candle forward+backward", |b| {
        b.iter(|| {
            let y = fc.forward(&x).expect("forward");
            y.sum_all().and_then(|s| s.backward()).expect("backward")
        })
    });
    group.finish();
}

/// Softmax cross-entropy over 10 classes, loss and gradient.
fn cross_entropy(c: &mut Criterion) {
    let logits = Var::from_tensor(&randn(&[64, 10])).expect("a variable");
    let labels = labels(64);
    let mut group = c.benchmark_group("cross_entropy/batch 64");
    group.throughput(Throughput::Elements(64));
    group.bench_function("kiln forward+backward", |b| {
        b.iter(|| {
            let loss = ops::cross_entropy(&logits, &labels, 0.0).expect("forward");
            loss.backward().expect("backward")
        })
    });
    group.bench_function("candle forward+backward", |b| {
        b.iter(|| {
            let loss = candle_nn::loss::cross_entropy(&logits, &labels).expect("forward");
            loss.backward().expect("backward")
        })
    });
    group.finish();
}

/// A batch of 64 from a data set of u8 images: gathered, converted and normalised.
fn gather(c: &mut Criterion) {
    let bytes: Vec<u8> = (0..10_000 * 3072).map(|i| (i * 7 % 251) as u8).collect();
    let images = Tensor::from_vec(bytes, (10_000, 3072), &Device::Cpu).expect("a CPU tensor");
    let order = Tensor::from_vec(
        (0..64u32).map(|i| i * 151 % 10_000).collect(),
        64,
        &Device::Cpu,
    )
    .expect("a CPU tensor");
    let norm = Normalisation {
        mean: &MEAN,
        std: &STD,
        plane: 1024,
    };
    let mut group = c.benchmark_group("gather_normalise/batch 64");
    group.throughput(Throughput::Elements(64));
    group.bench_function("kiln", |b| {
        b.iter(|| ops::gather_normalise(&images, &order, norm, None).expect("gather"))
    });
    group.bench_function("candle", |b| {
        b.iter(|| {
            ops::gather::gather_normalise_reference(&images, &order, norm, None).expect("gather")
        })
    });
    group.finish();
}

/// ResNet-18's 3x3 convolutions at batch 64 (CIFAR stem): one of each stage's, forward alone
/// and with the input and weight gradients.
fn resnet_conv(c: &mut Criterion) {
    for (channels, size) in [(64, 32), (128, 16), (256, 8), (512, 4)] {
        let x = Var::from_tensor(&randn(&[64, channels, size, size])).expect("a variable");
        let weight =
            Var::from_tensor(&(randn(&[channels, channels, 3, 3]) * 0.05).expect("scaled"))
                .expect("a variable");
        let mut group = c.benchmark_group(format!("resnet conv {channels}x{size}x{size}/batch 64"));
        group.throughput(Throughput::Elements(64));
        group.bench_function("kiln forward", |b| {
            b.iter(|| ops::conv2d(&x, &weight, None, SAME).expect("forward"))
        });
        group.bench_function("kiln forward+backward", |b| {
            b.iter(|| {
                let y = ops::conv2d(&x, &weight, None, SAME)?;
                y.sum_all()?.backward()
            })
        });
        group.finish();
    }
}

/// One Adam step over SimpleCNN's 41,418 parameters (kiln's in-place update).
fn adam(c: &mut Criterion) {
    let (spec, config) = resolve(Some("simplecnn"), None, &Overrides::default()).expect("config");
    let arch = models::Architecture::new(10, 32, models::Stem::Auto, 64).expect("shape");
    let built = models::build(spec, &arch, 0, &Device::Cpu).expect("model");
    let mut optimizer = optim::build(&config.optim(), &built.params, 1).expect("optimizer");
    let x = randn(&[64, 3, 32, 32]);
    let logits = built.module.forward_t(&x, true).expect("forward");
    let loss = ops::cross_entropy(&logits, &labels(64), 0.0).expect("loss");
    let grads = loss.backward().expect("backward");
    c.bench_function("adam step/simplecnn", |b| {
        b.iter(|| optimizer.step(black_box(&grads)).expect("step"))
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = ops_benches;
    config = config();
    targets = conv_block, resnet_conv, linear, cross_entropy, gather, adam
}
fn main() {
    // As the binaries: rayon's pool from RAYON_NUM_THREADS, denormals flushed on its threads.
    kiln::device::prepare_cpu_threads(None);
    ops_benches();
    Criterion::default().configure_from_args().final_summary();
}
