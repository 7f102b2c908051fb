//! `linear`: one `nn.Linear(1, 1)`, the tutorials' set-up check.

use candle_nn::ModuleT;

use super::{init, Architecture, ModelSpec, Scope, Task};

pub const SPEC: ModelSpec = ModelSpec {
    name: "linear",
    about: "one Linear(1, 1) fitting y = 3x + 2 (set-up check)",
    task: Task::LinearFit,
    has_stem: false,
    mixed_precision: false,
    default_config: include_str!("../../configs/linear.toml"),
    build,
    data_init: None,
};

fn build(_: &Architecture, scope: &Scope) -> candle_core::Result<Box<dyn ModuleT>> {
    // PyTorch names the parameters of a bare nn.Linear `weight` and `bias`, with no prefix.
    Ok(Box::new(init::linear(1, 1, scope.params.clone())?))
}
