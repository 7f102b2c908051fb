//! ONNX export: a trained model as an ONNX graph in evaluation mode, for ONNX Runtime, TensorRT,
//! onnxruntime-web and the rest (`export --weights W --onnx model.onnx`).
//!
//! The graph takes RGB images scaled to [0, 1], `input` [N, 3, H, W] f32, and normalises them
//! itself in its first two nodes (Sub, Div by the file's mean and deviation, which the metadata
//! records too); it returns `logits` [N, classes]. BatchNorm is folded into the convolution before
//! it unless asked to stay; GELU is written as its erf form (opset 13 and up have Erf). The
//! protobuf types are `onnx-protobuf`'s (rust-protobuf's code generated from onnx.proto).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{Tensor as TensorType, Value};
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::data::ChannelStats;
use crate::error::{Error, Result};
use crate::evaluate::Loaded;
use crate::models::Stem;

/// What an export writes besides the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The ONNX operator set the graph declares (13 or newer).
    pub opset: i64,
    /// The batch size the graph takes; None: any (a symbolic `batch` dimension).
    pub batch: Option<usize>,
    /// Fold each BatchNorm into the convolution before it (the default); false keeps
    /// BatchNormalization nodes.
    pub fold_batch_norm: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            opset: 17,
            batch: None,
            fold_batch_norm: true,
        }
    }
}

/// The oldest operator set whose operators the graph uses as it writes them.
pub const MIN_OPSET: i64 = 13;

/// `loaded`'s network as an ONNX model that takes images normalised by `stats`.
pub fn export(loaded: &Loaded, stats: ChannelStats, options: &Options) -> Result<ModelProto> {
    if options.opset < MIN_OPSET {
        return Err(Error::InvalidSetting(format!(
            "opset {} is older than the {MIN_OPSET} the graph needs",
            options.opset
        )));
    }
    let tensors: HashMap<String, Tensor> = loaded
        .built
        .params
        .state()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    let mut graph = Graph {
        tensors,
        fold: options.fold_batch_norm,
        proto: GraphProto {
            name: loaded.spec.name.to_string(),
            ..Default::default()
        },
        count: 0,
    };
    let side = loaded.arch.image_size;
    let x = graph.normalise("input", &stats)?;
    let logits = match loaded.spec.name {
        "simplecnn" => graph.simplecnn(&x)?,
        "resnet18" | "resnet34" | "resnet50" => graph.resnet(&x, loaded.arch.stem)?,
        "fastnet" => graph.fastnet(&x, side)?,
        other => {
            return Err(Error::InvalidSetting(format!(
                "{other} has no ONNX export (the image classifiers have)"
            )))
        }
    };
    graph.rename_output(&logits, "logits");
    let batch = batch_dimension(options);
    graph.proto.input.push(value_info(
        "input",
        vec![
            batch.clone(),
            dimension::Value::DimValue(3),
            dimension::Value::DimValue(side as i64),
            dimension::Value::DimValue(side as i64),
        ],
    ));
    graph.proto.output.push(value_info(
        "logits",
        vec![
            batch,
            dimension::Value::DimValue(loaded.arch.num_classes as i64),
        ],
    ));
    let metadata = [
        ("model", loaded.spec.name.to_string()),
        (
            "classes",
            serde_json::to_string(&loaded.class_names()).unwrap_or_default(),
        ),
        (
            "input",
            format!(
                "float32 [N,3,{side},{side}], RGB scaled to [0,1]; the graph normalises it (normalize_mean, normalize_std)"
            ),
        ),
        ("normalize_mean", ChannelStats::list(&stats.mean)),
        ("normalize_std", ChannelStats::list(&stats.std)),
        (
            "batch_norm",
            if options.fold_batch_norm {
                "folded into the convolutions".to_string()
            } else {
                "BatchNormalization nodes".to_string()
            },
        ),
    ];
    Ok(model_proto(graph.proto, options, metadata.to_vec()))
}

/// The model around `graph`, with its operator set and `metadata`.
fn model_proto(graph: GraphProto, options: &Options, metadata: Vec<(&str, String)>) -> ModelProto {
    ModelProto {
        // ONNX IR 8 (ONNX 1.13, opsets up to 18) or newer as the opset needs.
        ir_version: if options.opset > 18 { 9 } else { 8 },
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: options.opset,
            ..Default::default()
        }],
        producer_name: "kiln".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph).into(),
        metadata_props: metadata
            .into_iter()
            .map(|(key, value)| StringStringEntryProto {
                key: key.into(),
                value,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The tutorials' set-up check, one `nn.Linear(1, 1)` (`weight` [1, 1], `bias` [1], PyTorch's
/// names): `input` [N, 1] -> `output` [N, 1].
pub fn export_linear(tensors: &HashMap<String, Tensor>, options: &Options) -> Result<ModelProto> {
    let mut graph = Graph {
        tensors: tensors.clone(),
        fold: options.fold_batch_norm,
        proto: GraphProto {
            name: "linear".into(),
            ..Default::default()
        },
        count: 0,
    };
    for (name, dims) in [("weight", [1usize, 1].as_slice()), ("bias", [1].as_slice())] {
        let tensor = graph.tensor(name)?;
        if tensor.dims() != dims {
            return Err(Error::InvalidSetting(format!(
                "linear's {name} has shape {:?}, not {dims:?}: is this the set-up check's Linear(1, 1)?",
                tensor.dims()
            )));
        }
    }
    let y = graph.linear("input", "", 1.0)?;
    graph.rename_output(&y, "output");
    let batch = batch_dimension(options);
    let one = dimension::Value::DimValue(1);
    graph
        .proto
        .input
        .push(value_info("input", vec![batch.clone(), one.clone()]));
    graph
        .proto
        .output
        .push(value_info("output", vec![batch, one]));
    Ok(model_proto(
        graph.proto,
        options,
        vec![("model", "linear".to_string())],
    ))
}

/// `model` as the bytes of an .onnx file.
pub fn to_bytes(model: &ModelProto) -> Result<Vec<u8>> {
    model
        .write_to_bytes()
        .map_err(|err| Error::InvalidSetting(format!("cannot encode the ONNX model: {err}")))
}

struct Graph {
    tensors: HashMap<String, Tensor>,
    fold: bool,
    proto: GraphProto,
    /// Names handed out so far, for unique value names.
    count: usize,
}

impl Graph {
    fn fresh(&mut self, what: &str) -> String {
        self.count += 1;
        format!("{what}_{}", self.count)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::InvalidSetting(format!("the weights have no tensor {name}")))
    }

    /// An initializer holding `values` of `shape` (f32), under a fresh name.
    fn constant(&mut self, what: &str, values: Vec<f32>, shape: &[usize]) -> String {
        let name = self.fresh(what);
        self.proto.initializer.push(TensorProto {
            name: name.clone(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: DataType::FLOAT as i32,
            float_data: values,
            ..Default::default()
        });
        name
    }

    fn constant_of(&mut self, what: &str, t: &Tensor) -> Result<String> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.constant(what, values, t.dims()))
    }

    fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let output = self.fresh(&op.to_ascii_lowercase());
        self.proto.node.push(NodeProto {
            op_type: op.into(),
            name: output.clone(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            attribute: attributes,
            ..Default::default()
        });
        output
    }

    fn rename_output(&mut self, value: &str, to: &str) {
        for node in &mut self.proto.node {
            for output in &mut node.output {
                if output == value {
                    *output = to.to_string();
                }
            }
        }
    }

    /// (x - mean) / std per channel.
    fn normalise(&mut self, x: &str, stats: &ChannelStats) -> Result<String> {
        let mean = self.constant("mean", stats.mean.to_vec(), &[1, 3, 1, 1]);
        let std = self.constant("std", stats.std.to_vec(), &[1, 3, 1, 1]);
        let centred = self.node("Sub", &[x, &mean], vec![]);
        Ok(self.node("Div", &[&centred, &std], vec![]))
    }

    /// A convolution of `prefix.weight` (and `prefix.bias` where the file has one), followed by
    /// the BatchNorm `norm` (folded in, or as its own node) where given.
    fn conv(
        &mut self,
        x: &str,
        prefix: &str,
        stride: usize,
        padding: usize,
        norm: Option<(&str, f64)>,
    ) -> Result<String> {
        let mut weight = self
            .tensor(&format!("{prefix}.weight"))?
            .to_dtype(DType::F32)?;
        let (cout, _, kh, kw) = weight.dims4()?;
        let mut bias = match self.tensors.get(&format!("{prefix}.bias")) {
            Some(b) => Some(b.to_dtype(DType::F32)?),
            None => None,
        };
        let mut unfolded = None;
        if let Some((norm, eps)) = norm {
            if self.fold {
                let (gamma, beta, mean, var) = self.norm_tensors(norm)?;
                // w' = w * gamma / sqrt(var + eps); b' = (b - mean) * gamma / sqrt(var + eps) + beta.
                let scale = (gamma / (var + eps)?.sqrt()?)?;
                weight = weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
                let b = match bias {
                    Some(b) => b,
                    None => Tensor::zeros(cout, DType::F32, scale.device())?,
                };
                bias = Some(((b - mean)? * scale)?.add(&beta)?);
            } else {
                unfolded = Some((norm, eps));
            }
        }
        let w = self.constant_of("weight", &weight)?;
        let b = match &bias {
            Some(b) => Some(self.constant_of("bias", b)?),
            None => None,
        };
        let mut inputs = vec![x, w.as_str()];
        if let Some(b) = &b {
            inputs.push(b);
        }
        let p = padding as i64;
        let attributes = vec![
            ints("kernel_shape", &[kh as i64, kw as i64]),
            ints("strides", &[stride as i64, stride as i64]),
            ints("pads", &[p, p, p, p]),
            ints("dilations", &[1, 1]),
            int("group", 1),
        ];
        let y = self.node("Conv", &inputs, attributes);
        match unfolded {
            None => Ok(y),
            Some((norm, eps)) => self.batch_norm(&y, norm, eps),
        }
    }

    fn norm_tensors(&self, norm: &str) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let get = |what: &str| -> Result<Tensor> {
            Ok(self
                .tensor(&format!("{norm}.{what}"))?
                .to_dtype(DType::F32)?)
        };
        Ok((
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        ))
    }

    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }

    /// GELU, erf form: x * (1 + erf(x / sqrt(2))) / 2.
    fn gelu(&mut self, x: &str) -> String {
        let root2 = self.constant("sqrt2", vec![std::f32::consts::SQRT_2], &[]);
        let one = self.constant("one", vec![1.0], &[]);
        let half = self.constant("half", vec![0.5], &[]);
        let scaled = self.node("Div", &[x, &root2], vec![]);
        let erf = self.node("Erf", &[&scaled], vec![]);
        let shifted = self.node("Add", &[&erf, &one], vec![]);
        let product = self.node("Mul", &[x, &shifted], vec![]);
        self.node("Mul", &[&product, &half], vec![])
    }

    fn max_pool(&mut self, x: &str, kernel: usize, stride: usize, padding: usize) -> String {
        let (k, s, p) = (kernel as i64, stride as i64, padding as i64);
        self.node(
            "MaxPool",
            &[x],
            vec![
                ints("kernel_shape", &[k, k]),
                ints("strides", &[s, s]),
                ints("pads", &[p, p, p, p]),
            ],
        )
    }

    /// `x` [N, features] through `prefix` (weight [out, in], bias if any) times `alpha`.
    fn linear(&mut self, x: &str, prefix: &str, alpha: f32) -> Result<String> {
        let name = |what: &str| {
            if prefix.is_empty() {
                what.to_string()
            } else {
                format!("{prefix}.{what}")
            }
        };
        let w = self.constant_of("fc_weight", &self.tensor(&name("weight"))?)?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = self.tensors.get(&name("bias")).cloned() {
            inputs.push(self.constant_of("fc_bias", &b)?);
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.node(
            "Gemm",
            &inputs,
            vec![int("transB", 1), float("alpha", alpha)],
        ))
    }

    fn flatten(&mut self, x: &str) -> String {
        self.node("Flatten", &[x], vec![int("axis", 1)])
    }

    /// The tutorials' SimpleCNN: conv 3x3 -> ReLU -> max-pool 2 -> linear.
    fn simplecnn(&mut self, x: &str) -> Result<String> {
        let h = self.conv(x, "conv1", 1, 1, None)?;
        let h = self.relu(&h);
        let h = self.max_pool(&h, 2, 2, 0);
        let h = self.flatten(&h);
        self.linear(&h, "fc", 1.0)
    }

    /// torchvision's ResNet (BasicBlock or Bottleneck, read from the weights' names).
    fn resnet(&mut self, x: &str, stem: Stem) -> Result<String> {
        const EPS: f64 = 1e-5;
        let mut h = match stem {
            Stem::Imagenet => {
                let h = self.conv(x, "conv1", 2, 3, Some(("bn1", EPS)))?;
                let h = self.relu(&h);
                self.max_pool(&h, 3, 2, 1)
            }
            Stem::Cifar | Stem::Auto => {
                let h = self.conv(x, "conv1", 1, 1, Some(("bn1", EPS)))?;
                self.relu(&h)
            }
        };
        let bottleneck = self.tensors.contains_key("layer1.0.conv3.weight");
        for stage in 1..=4 {
            let mut block = 0;
            while self
                .tensors
                .contains_key(&format!("layer{stage}.{block}.conv1.weight"))
            {
                let name = format!("layer{stage}.{block}");
                let stride = if block == 0 && stage > 1 { 2 } else { 1 };
                // (kernel, stride) of conv1, conv2 (, conv3): a bottleneck strides its 3x3.
                let convs: Vec<(usize, usize)> = if bottleneck {
                    vec![(1, 1), (3, stride), (1, 1)]
                } else {
                    vec![(3, stride), (3, 1)]
                };
                let last = convs.len();
                let mut y = h.clone();
                for (i, &(kernel, s)) in convs.iter().enumerate() {
                    let conv = format!("{name}.conv{}", i + 1);
                    let bn = format!("{name}.bn{}", i + 1);
                    y = self.conv(&y, &conv, s, kernel / 2, Some((&bn, EPS)))?;
                    if i + 1 < last {
                        y = self.relu(&y);
                    }
                }
                let shortcut = if self
                    .tensors
                    .contains_key(&format!("{name}.downsample.0.weight"))
                {
                    let conv = format!("{name}.downsample.0");
                    let bn = format!("{name}.downsample.1");
                    self.conv(&h, &conv, stride, 0, Some((&bn, EPS)))?
                } else {
                    h.clone()
                };
                let sum = self.node("Add", &[&y, &shortcut], vec![]);
                h = self.relu(&sum);
                block += 1;
            }
        }
        let pooled = self.node("GlobalAveragePool", &[&h], vec![]);
        let features = self.flatten(&pooled);
        self.linear(&features, "fc", 1.0)
    }

    /// airbench94's network (`models::fastnet`).
    fn fastnet(&mut self, x: &str, side: usize) -> Result<String> {
        let eps = crate::models::fastnet::NORM_EPS;
        let h = self.conv(x, "0", 1, 0, None)?;
        let mut h = self.gelu(&h);
        let mut plane = side - 1;
        for group in 2..=4 {
            let g = group.to_string();
            let y = self.conv(&h, &format!("{g}.conv1"), 1, 1, None)?;
            let y = self.max_pool(&y, 2, 2, 0);
            plane /= 2;
            let y = self.batch_norm(&y, &format!("{g}.norm1"), eps)?;
            let y = self.gelu(&y);
            let y = self.conv(
                &y,
                &format!("{g}.conv2"),
                1,
                1,
                Some((&format!("{g}.norm2"), eps)),
            )?;
            h = self.gelu(&y);
        }
        let pooled = self.max_pool(&h, plane, plane, 0);
        let features = self.flatten(&pooled);
        self.linear(&features, "7", crate::models::fastnet::HEAD_SCALE as f32)
    }

    /// A BatchNorm with no convolution right before it to fold into: its own node either way.
    fn batch_norm(&mut self, x: &str, norm: &str, eps: f64) -> Result<String> {
        let (gamma, beta, mean, var) = self.norm_tensors(norm)?;
        let names = [
            self.constant_of("bn_scale", &gamma)?,
            self.constant_of("bn_bias", &beta)?,
            self.constant_of("bn_mean", &mean)?,
            self.constant_of("bn_var", &var)?,
        ];
        let inputs: Vec<&str> = std::iter::once(x)
            .chain(names.iter().map(String::as_str))
            .collect();
        Ok(self.node(
            "BatchNormalization",
            &inputs,
            vec![float("epsilon", eps as f32)],
        ))
    }
}

/// The batch dimension of the graph's input and output: fixed, or the symbol `batch`.
fn batch_dimension(options: &Options) -> dimension::Value {
    match options.batch {
        Some(n) => dimension::Value::DimValue(n as i64),
        None => dimension::Value::DimParam("batch".into()),
    }
}

fn value_info(name: &str, dims: Vec<dimension::Value>) -> ValueInfoProto {
    let shape = TensorShapeProto {
        dim: dims
            .into_iter()
            .map(|value| Dimension {
                value: Some(value),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        type_: Some(TypeProto {
            value: Some(Value::TensorType(TensorType {
                elem_type: DataType::FLOAT as i32,
                shape: Some(shape).into(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::INTS.into(),
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::INT.into(),
        i: value,
        ..Default::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::FLOAT.into(),
        f: value,
        ..Default::default()
    }
}
