//! kiln: train deep-learning models on your own machine (Metal, CUDA or CPU), on candle.
//!
//! Data flows one way: files ([`data`]) -> batches -> model ([`models`]) -> loss -> gradients ->
//! optimizer ([`optim`]) -> weights on disk ([`checkpoint`]), driven by [`train`].

/// `Display` and `FromStr` for enums that derive `clap::ValueEnum`, from the names (and aliases)
/// declared on the enum for clap: a setting's names are written once, and read the same on the
/// command line, in configs (serde's lowercase names; `tests::setting_names_agree` holds them
/// to it) and in weights files' metadata. `what` names the setting in errors.
macro_rules! setting_names {
    ($($t:ty => $what:literal),* $(,)?) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let value = clap::ValueEnum::to_possible_value(self);
                f.write_str(value.as_ref().map_or("", |v| v.get_name()))
            }
        }

        impl std::str::FromStr for $t {
            type Err = crate::error::Error;

            fn from_str(s: &str) -> crate::error::Result<Self> {
                <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| {
                    let names: Vec<String> = <Self as clap::ValueEnum>::value_variants()
                        .iter()
                        .map(|v| v.to_string())
                        .collect();
                    crate::error::Error::InvalidSetting(format!(
                        "unknown {} '{s}': expected {}",
                        $what,
                        names.join(", ")
                    ))
                })
            }
        }
    )*};
}

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod evaluate;
pub mod fs;
pub mod metrics;
pub mod models;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod plots;
pub mod predict;
pub mod profile;
pub mod report;
pub mod tensorboard;
pub mod train;

pub use error::{Error, Result};

setting_names! {
    config::Precision => "precision",
    data::Dataset => "data set",
    data::augment::PaddingMode => "padding mode",
    models::Stem => "stem",
    optim::OptimizerKind => "optimizer",
    optim::schedule::ScheduleKind => "schedule",
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;
    use serde::{de::DeserializeOwned, Serialize};

    /// Every name serde writes in a config parses back through the command line's names, and
    /// the other way round.
    fn agree<T: ValueEnum + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>() {
        for value in T::value_variants() {
            let written = serde_json::to_value(value).unwrap();
            let name = value.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(written, serde_json::Value::String(name.clone()));
            assert_eq!(&T::from_str(&name, true).unwrap(), value);
            let read: T = serde_json::from_value(written).unwrap();
            assert_eq!(&read, value);
        }
    }

    #[test]
    fn setting_names_agree() {
        agree::<crate::config::Precision>();
        agree::<crate::data::Dataset>();
        agree::<crate::data::augment::PaddingMode>();
        agree::<crate::models::Stem>();
        agree::<crate::optim::OptimizerKind>();
        agree::<crate::optim::schedule::ScheduleKind>();
        let err = "rmsprop"
            .parse::<crate::optim::OptimizerKind>()
            .unwrap_err();
        let err = err.to_string();
        assert!(
            err.ends_with("unknown optimizer 'rmsprop': expected adam, adamw, sgd"),
            "{err}"
        );
    }
}
