//! CUDA against the CPU, on the same inputs: every parameter's gradient of every model, kiln's
//! CUDA kernels one by one, and a whole Adam step. candle has shipped wrong conv weight
//! gradients on non-CPU backends; this is where such a thing is caught.
//!
//! Runs where kiln is built with `--features cuda` and a GPU answers; elsewhere each test says it
//! was skipped and passes.

use candle_core::{DType, Device, Tensor, Var};
use kiln::data::batches::{BatchBuffer, DeviceSet};
use kiln::data::synthetic;
use kiln::device::DeviceRequest;
use kiln::models::{self, Task, MODELS};
use kiln::ops::{self, ConvParams};

/// Gradients agree within this share of the largest gradient of the parameter: the GPU sums in
/// other orders (and fuses multiply-adds), so bits differ; a wrong gradient is off by far more.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn cuda() -> Option<Device> {
    match kiln::device::open(DeviceRequest::Cuda(0)) {
        Ok(device) => Some(device),
        Err(err) => {
            eprintln!("skipped: no CUDA device ({err})");
            None
        }
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("a tensor readable as f32")
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

/// A model's loss on a fixed batch, on `device`, and its gradients by parameter name.
fn gradients(spec: &models::ModelSpec, device: &Device) -> Vec<(String, Tensor)> {
    let built = models::build(spec, 7, device).expect("the model builds");
    let loss = match spec.task {
        Task::ImageClassification => {
            let set = DeviceSet::new(synthetic::generate(48, 3), device).expect("data fits");
            let order = set.order(&(0..48).rev().collect::<Vec<_>>()).unwrap();
            let mut buffer = BatchBuffer::default();
            let (images, labels) = set.batch(&order, 0..48, &mut buffer).unwrap();
            let logits = built.module.forward(&images).unwrap();
            ops::cross_entropy(&logits, &labels).unwrap()
        }
        Task::LinearFit => {
            let x = Tensor::arange(0f32, 32.0, &Device::Cpu)
                .and_then(|x| (x / 16.0)?.reshape((32, 1))?.to_device(device))
                .unwrap();
            let y = x.affine(3.0, 2.0).unwrap();
            let prediction = built.module.forward(&x).unwrap();
            (prediction - y).unwrap().sqr().unwrap().mean_all().unwrap()
        }
    };
    let grads = loss.backward().expect("backward runs");
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
    let Some(gpu) = cuda() else { return };
    for spec in MODELS {
        let on_cpu = gradients(spec, &Device::Cpu);
        let on_gpu = gradients(spec, &gpu);
        assert_eq!(on_cpu.len(), on_gpu.len());
        for ((name, a), (_, b)) in on_cpu.iter().zip(&on_gpu) {
            assert_close(&format!("{} {name} gradient", spec.name), a, b);
        }
    }
}

#[test]
fn batches_gathered_on_the_gpu_are_the_cpus_bit_for_bit() {
    let Some(gpu) = cuda() else { return };
    let set = synthetic::generate(40, 1);
    // A full batch, then a shorter one written over it in the same buffer.
    let batch = |device: &Device| {
        let on_device = DeviceSet::new(set.clone(), device).unwrap();
        let order = on_device.order(&[39, 0, 17, 17, 5, 21]).unwrap();
        let mut buffer = BatchBuffer::default();
        let (first, _) = on_device.batch(&order, 1..5, &mut buffer).unwrap();
        let first = values(&first);
        let (x, y) = on_device.batch(&order, 4..6, &mut buffer).unwrap();
        (first, values(&x), y.to_vec1::<u32>().unwrap())
    };
    assert_eq!(batch(&Device::Cpu), batch(&gpu));
}

#[test]
fn the_fused_block_and_the_loss_match_the_cpu_on_odd_shapes() {
    let Some(gpu) = cuda() else { return };
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
        let loss = ops::cross_entropy(&logits, &labels).unwrap();
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
    let Some(gpu) = cuda() else { return };
    for spec in MODELS {
        let (_, mut config) =
            kiln::config::resolve(Some(spec.name), None, &kiln::config::Overrides::default())
                .unwrap();
        // Every branch of the update: momentum (SGD's buffer starts, then accumulates), decay.
        config.momentum = 0.9;
        config.weight_decay = 0.01;
        let grads = gradients(spec, &Device::Cpu);
        let step = |device: &Device| {
            let built = models::build(spec, 7, device).unwrap();
            let params = built.params.vars();
            let mut optimizer = kiln::optim::build(&config, params.clone()).unwrap();
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
