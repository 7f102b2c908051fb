//! `linear`: one `nn.Linear(1, 1)`, the tutorials' set-up check.

use candle_nn::{Module, VarBuilder};

use super::{init, ModelSpec, Task};

pub const SPEC: ModelSpec = ModelSpec {
    name: "linear",
    about: "one Linear(1, 1) fitting y = 3x + 2 (set-up check)",
    task: Task::LinearFit,
    default_config: include_str!("../../configs/linear.toml"),
    build,
};

fn build(vb: VarBuilder) -> candle_core::Result<Box<dyn Module>> {
    // PyTorch names the parameters of a bare nn.Linear `weight` and `bias`, with no prefix.
    Ok(Box::new(init::linear(1, 1, vb)?))
}
