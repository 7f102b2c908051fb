//! Learning-rate schedules, stepped per batch: the rate for global step `t` (0 for the first
//! batch of the run) is a pure function of `t`, the run's length and the config, so a resumed
//! run continues the schedule exactly.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// `lr` throughout.
    #[default]
    Constant,
    /// `lr * gamma^(epochs done / step_epochs)`, as `StepLR`.
    Step,
    /// Linear warm-up over `warmup_epochs`, then a cosine from `lr` to `min_lr`.
    Cosine,
    /// Linear warm-up over `warmup_epochs`, then a straight line from `lr` to `min_lr`.
    Linear,
    /// PyTorch's `OneCycleLR` (no momentum cycling): from `lr / div_factor` up to `lr` over
    /// the first `pct_start` of the steps, then down to `lr / div_factor / final_div_factor`,
    /// along cosines or straight lines (`anneal`).
    OneCycle,
}

/// The `[schedule]` table of a config; each key applies to the kinds its comment names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// cosine, linear: epochs (fractions allowed) of linear warm-up from 0.
    pub warmup_epochs: f64,
    /// step: epochs between decays.
    pub step_epochs: usize,
    /// step: the factor of each decay.
    pub gamma: f64,
    /// cosine, linear: the rate at the last step.
    pub min_lr: f64,
    /// onecycle: the share of steps spent rising.
    pub pct_start: f64,
    /// onecycle: the first rate is lr / div_factor.
    pub div_factor: f64,
    /// onecycle: the last rate is lr / div_factor / final_div_factor.
    pub final_div_factor: f64,
    /// onecycle: the shape of both phases (PyTorch's `anneal_strategy`).
    pub anneal: Anneal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anneal {
    #[default]
    Cos,
    Linear,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_epochs: 0.0,
            step_epochs: 10,
            gamma: 0.1,
            min_lr: 0.0,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            anneal: Anneal::Cos,
        }
    }
}

impl Schedule {
    pub fn validate(&self, epochs: usize, lr: f64) -> std::result::Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("schedule.{name} must be > 0, got {v}"))
            }
        };
        positive("gamma", self.gamma)?;
        positive("div_factor", self.div_factor)?;
        positive("final_div_factor", self.final_div_factor)?;
        if self.step_epochs == 0 {
            return Err("schedule.step_epochs must be at least 1".into());
        }
        if !(self.pct_start > 0.0 && self.pct_start < 1.0) {
            return Err(format!(
                "schedule.pct_start must be in (0, 1), got {}",
                self.pct_start
            ));
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= lr) {
            return Err(format!(
                "schedule.min_lr must be in [0, lr = {lr}], got {}",
                self.min_lr
            ));
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs < epochs as f64) {
            return Err(format!(
                "schedule.warmup_epochs must be in [0, epochs = {epochs}), got {}",
                self.warmup_epochs
            ));
        }
        Ok(())
    }

    /// The learning rate for global step `t` of a run of `epochs` epochs of `steps_per_epoch`
    /// steps, peaking at `lr`.
    pub fn rate(&self, lr: f64, t: u64, epochs: usize, steps_per_epoch: usize) -> f64 {
        let t = t as f64;
        let per_epoch = steps_per_epoch.max(1) as f64;
        let total = (epochs.max(1) as f64 * per_epoch).max(1.0);
        let warmup = (self.warmup_epochs * per_epoch).round();
        // The share of the decay done at t, after the warm-up.
        let decayed = || ((t - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
        match self.kind {
            ScheduleKind::Constant => lr,
            ScheduleKind::Step => {
                let decays = (t / (self.step_epochs as f64 * per_epoch)).floor();
                lr * self.gamma.powf(decays)
            }
            ScheduleKind::Cosine if t < warmup => lr * (t + 1.0) / warmup,
            ScheduleKind::Cosine => {
                self.min_lr + (lr - self.min_lr) * (1.0 + (PI * decayed()).cos()) / 2.0
            }
            ScheduleKind::Linear if t < warmup => lr * (t + 1.0) / warmup,
            ScheduleKind::Linear => lr + (self.min_lr - lr) * decayed(),
            ScheduleKind::OneCycle => {
                let initial = lr / self.div_factor;
                let last = initial / self.final_div_factor;
                // As OneCycleLR: phase ends at float(pct_start * total) - 1 and total - 1.
                let rise_end = self.pct_start * total - 1.0;
                let (start, end, pct) = if t <= rise_end {
                    (initial, lr, t / rise_end)
                } else {
                    (lr, last, (t - rise_end) / (total - 1.0 - rise_end))
                };
                match self.anneal {
                    Anneal::Cos => end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0),
                    Anneal::Linear => start + (end - start) * pct,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            ..Schedule::default()
        }
    }

    /// `torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20,
    /// cycle_momentum=False)`: the rate before each of the 20 steps, as torch 2.15 printed it.
    #[test]
    fn onecycle_is_pytorchs() {
        let pytorch = [
            0.0040000000000000036,
            0.013167184270002533,
            0.037167184270002526,
            0.06683281572999747,
            0.09083281572999748,
            0.1,
            0.09874640062350874,
            0.09504846320134738,
            0.089091617757105,
            0.0811745653949763,
            0.07169430017913009,
            0.06112620219362893,
            0.0500002,
            0.03887419780637107,
            0.028306099820869922,
            0.0188258346050237,
            0.010908782242895003,
            0.004951936798652629,
            0.0012539993764912555,
            4e-07,
        ];
        let s = with(ScheduleKind::OneCycle);
        for (t, want) in pytorch.iter().enumerate() {
            let got = s.rate(0.1, t as u64, 4, 5);
            assert!((got - want).abs() < 1e-15, "step {t}: {got} vs {want}");
        }
    }

    /// `OneCycleLR(max_lr=0.1, total_steps=20, anneal_strategy="linear")`: its phases end at
    /// steps 5 and 19, and each moves along a straight line.
    #[test]
    fn onecycle_anneals_linearly_when_asked() {
        let linear = Schedule {
            anneal: Anneal::Linear,
            ..with(ScheduleKind::OneCycle)
        };
        let rate = |t| linear.rate(0.1, t, 2, 10);
        for (t, want) in [
            (0, 0.004),
            (1, 0.0232),
            (5, 0.1),
            (12, 0.0500002),
            (19, 4e-7),
        ] {
            assert!((rate(t) - want).abs() < 1e-12, "step {t}: {}", rate(t));
        }
    }

    #[test]
    fn warmup_then_cosine_or_linear_and_steps() {
        let cosine = Schedule {
            warmup_epochs: 1.0,
            ..with(ScheduleKind::Cosine)
        };
        // 10 steps an epoch, 3 epochs: warm-up 0.1, 0.2, ... 1.0 over the first 10.
        assert!((cosine.rate(1.0, 0, 3, 10) - 0.1).abs() < 1e-12);
        assert!((cosine.rate(1.0, 9, 3, 10) - 1.0).abs() < 1e-12);
        assert!((cosine.rate(1.0, 10, 3, 10) - 1.0).abs() < 1e-12);
        assert!((cosine.rate(1.0, 20, 3, 10) - 0.5).abs() < 1e-12);
        let linear = Schedule {
            min_lr: 0.2,
            ..with(ScheduleKind::Linear)
        };
        assert!((linear.rate(1.0, 15, 3, 10) - 0.6).abs() < 1e-12);
        let step = Schedule {
            step_epochs: 2,
            ..with(ScheduleKind::Step)
        };
        assert_eq!(step.rate(1.0, 19, 6, 10), 1.0);
        assert!((step.rate(1.0, 20, 6, 10) - 0.1).abs() < 1e-12);
        assert!((step.rate(1.0, 59, 6, 10) - 0.01).abs() < 1e-12);
        assert_eq!(with(ScheduleKind::Constant).rate(0.3, 1000, 2, 10), 0.3);
    }

    #[test]
    fn bad_settings_and_names_are_refused() {
        assert!("onecycle".parse::<ScheduleKind>().is_ok());
        let err = "exponential"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("onecycle"), "{err}");
        let bad = Schedule {
            pct_start: 1.5,
            ..Schedule::default()
        };
        assert!(bad.validate(10, 0.1).is_err());
        let bad = Schedule {
            warmup_epochs: 10.0,
            ..Schedule::default()
        };
        assert!(bad.validate(10, 0.1).is_err());
        assert!(Schedule::default().validate(10, 0.1).is_ok());
    }
}
