//! Ends a data-parallel job whose training steps stop. A rank that hangs (a stopped process, a
//! deadlocked data reader, a GPU that stops answering) leaves the others waiting inside a
//! collective, and neither MPI nor NCCL waits with a limit; `mpirun` only notices ranks that
//! exit. As PyTorch's NCCL timeout does, a rank that finishes no step for
//! [`timeout`] says so and aborts the job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::World;
use crate::error::{Error, Result};

/// The variable that sets [`timeout`], in seconds.
pub const TIMEOUT_VARIABLE: &str = "KILN_COLLECTIVE_TIMEOUT";

/// PyTorch's default for NCCL's collectives.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a rank may go without finishing a training step: `KILN_COLLECTIVE_TIMEOUT`
/// seconds, 600 unless set.
pub fn timeout() -> Result<Duration> {
    timeout_from(std::env::var(TIMEOUT_VARIABLE).ok().as_deref())
}

fn timeout_from(value: Option<&str>) -> Result<Duration> {
    let Some(value) = value else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match value.trim().parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(Duration::from_secs_f64(seconds)),
        _ => Err(Error::InvalidSetting(format!(
            "{TIMEOUT_VARIABLE}={value}: expected a number of seconds above 0"
        ))),
    }
}

/// What [`Watchdog::pause`] stores: not watching.
const PAUSED: u64 = u64::MAX;

struct Shared {
    start: Instant,
    /// Milliseconds from `start` to the last sign of progress, or [`PAUSED`].
    last: AtomicU64,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// A thread that aborts the job when no step has finished for the timeout, while armed.
pub struct Watchdog {
    shared: Arc<Shared>,
    /// Dropped to end the thread, which holds a handle on MPI: MPI finalises only once it is
    /// gone.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watches `world`'s steps (armed from now), or nothing outside a data-parallel job.
    pub fn start(world: &World, timeout: Duration) -> Option<Self> {
        if !world.is_distributed() {
            return None;
        }
        let shared = Arc::new(Shared {
            start: Instant::now(),
            last: AtomicU64::new(0),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let watched = Arc::clone(&shared);
        let world = world.clone();
        let tick = (timeout / 4).min(Duration::from_secs(1));
        let spawned = std::thread::Builder::new()
            .name("kiln-watchdog".into())
            .spawn(move || loop {
                if let Err(mpsc::RecvTimeoutError::Disconnected) = stopped.recv_timeout(tick) {
                    return;
                }
                let last = watched.last.load(Ordering::Acquire);
                if last != PAUSED
                    && Duration::from_millis(watched.now().saturating_sub(last)) > timeout
                {
                    eprintln!(
                        "error: rank {} of {}: no training step finished in {:.0} s; a rank hung \
                         or a collective stalled, so the job ends ({TIMEOUT_VARIABLE} sets the \
                         limit in seconds)",
                        world.rank(),
                        world.size(),
                        timeout.as_secs_f64()
                    );
                    world.abort(1);
                    std::process::exit(1);
                }
            });
        // Without a thread the job only loses the limit; training goes on.
        spawned.ok().map(|thread| Self {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A step finished (or the steps start again): the timeout counts from now.
    pub fn alive(&self) {
        self.shared.last.store(self.shared.now(), Ordering::Release);
    }

    /// Stops watching until [`Watchdog::alive`]: evaluation and checkpoints are not steps.
    pub fn pause(&self) {
        self.shared.last.store(PAUSED, Ordering::Release);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_is_600_s_unless_set_and_a_bad_value_is_an_error() {
        assert_eq!(timeout_from(None).unwrap(), Duration::from_secs(600));
        assert_eq!(
            timeout_from(Some(" 2.5")).unwrap(),
            Duration::from_millis(2500)
        );
        for bad in ["0", "-1", "ten", "inf", ""] {
            let err = timeout_from(Some(bad)).unwrap_err().to_string();
            assert!(err.contains(TIMEOUT_VARIABLE), "{bad}: {err}");
        }
    }
}
