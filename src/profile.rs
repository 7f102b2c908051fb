//! Where training time goes: each phase of a step runs inside a `tracing` span (which `--trace`
//! records as a Chrome/Perfetto trace) and adds its wall time to a per-epoch total.
//!
//! GPU backends run asynchronously: a span would time the launch, not the work. When `sync` is
//! on (tracing enabled) each phase waits for the device before it ends, so spans measure device
//! time honestly; normal runs stay asynchronous.

use std::time::{Duration, Instant};

use candle_core::Device;

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Data,
    Forward,
    Backward,
    Optimizer,
    Evaluate,
    /// Observers' work between steps and after epochs: checkpoints, metrics, plots.
    Checkpoint,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Data,
        Phase::Forward,
        Phase::Backward,
        Phase::Optimizer,
        Phase::Evaluate,
        Phase::Checkpoint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
            Phase::Evaluate => "evaluate",
            Phase::Checkpoint => "checkpoint",
        }
    }

    fn span(self) -> tracing::Span {
        // Span names must be literals for tracing's callsites.
        match self {
            Phase::Data => tracing::info_span!("data"),
            Phase::Forward => tracing::info_span!("forward"),
            Phase::Backward => tracing::info_span!("backward"),
            Phase::Optimizer => tracing::info_span!("optimizer"),
            Phase::Evaluate => tracing::info_span!("evaluate"),
            Phase::Checkpoint => tracing::info_span!("checkpoint"),
        }
    }
}

#[derive(Clone)]
pub struct PhaseTimer {
    totals: [Duration; Phase::ALL.len()],
    /// Wait for this device at the end of each phase.
    sync: Option<Device>,
}

impl PhaseTimer {
    pub fn new(device: &Device, sync: bool) -> Self {
        Self {
            totals: Default::default(),
            sync: sync.then(|| device.clone()),
        }
    }

    /// Runs `work` as `phase`: inside its span, timed.
    pub fn time<T>(&mut self, phase: Phase, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let _span = phase.span().entered();
        let start = Instant::now();
        let out = work()?;
        if let Some(device) = &self.sync {
            device.synchronize()?;
        }
        self.totals[phase as usize] += start.elapsed();
        Ok(out)
    }

    /// Each phase's share of the time measured, in [0, 1].
    pub fn fractions(&self) -> [(&'static str, f64); Phase::ALL.len()] {
        let total: f64 = self
            .totals
            .iter()
            .map(Duration::as_secs_f64)
            .sum::<f64>()
            .max(1e-12);
        Phase::ALL.map(|p| (p.name(), self.totals[p as usize].as_secs_f64() / total))
    }

    /// The shares as text, e.g. `data 2%, forward 21%, ...`.
    pub fn shares(&self) -> String {
        self.fractions()
            .iter()
            .map(|(name, f)| format!("{name} {:.0}%", 100.0 * f))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn reset(&mut self) {
        self.totals = Default::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_per_phase_and_reset() {
        let mut timer = PhaseTimer::new(&Device::Cpu, true);
        timer
            .time(Phase::Forward, || {
                std::thread::sleep(Duration::from_millis(40));
                Ok(())
            })
            .unwrap();
        timer
            .time(Phase::Backward, || {
                std::thread::sleep(Duration::from_millis(10));
                Ok(())
            })
            .unwrap();
        let percent = |name: &str| -> u32 {
            let shares = timer.shares();
            let start = shares.find(&format!("{name} ")).unwrap() + name.len() + 1;
            shares[start..].split('%').next().unwrap().parse().unwrap()
        };
        assert_eq!(percent("data"), 0);
        assert!(
            percent("forward") > 50 && percent("backward") > 0,
            "{}",
            timer.shares()
        );
        assert!((99..=101).contains(&(percent("forward") + percent("backward"))));
        timer.reset();
        assert!(timer.shares().starts_with("data 0%, forward 0%"));
    }
}
