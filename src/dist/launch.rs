//! How a process learns that a launcher started it as one of several, and `train --gpus N`,
//! which starts those processes itself through `mpirun`.

use std::ffi::OsString;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::error::{Error, Result};

/// What a launcher told this process in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    pub rank: usize,
    pub size: usize,
    /// Who started it, for messages.
    pub launcher: &'static str,
}

/// The launchers kiln recognises: (rank variable, size variable, name). Open MPI's `mpirun`,
/// MPICH's and Intel MPI's Hydra (also SLURM's PMI), and SLURM's `srun` step.
const LAUNCHERS: [(&str, &str, &str); 3] = [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "mpirun"),
    ("PMI_RANK", "PMI_SIZE", "mpiexec"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "srun"),
];

/// The launch this process is part of, if a launcher started it.
pub fn launched() -> Option<Launched> {
    launched_from(|name| std::env::var(name).ok())
}

fn launched_from(var: impl Fn(&str) -> Option<String>) -> Option<Launched> {
    LAUNCHERS.iter().find_map(|&(rank, size, launcher)| {
        let rank = var(rank)?.trim().parse().ok()?;
        let size = var(size)?.trim().parse().ok()?;
        Some(Launched {
            rank,
            size,
            launcher,
        })
    })
}

/// The environment every process of a multi-GPU run gets: NVLink SHARP (multicast) stays off,
/// as on machines whose fabric manager does not offer it NCCL's set-up would fail.
pub const GPU_ENVIRONMENT: [(&str, &str); 1] = [("NCCL_NVLS_ENABLE", "0")];

/// `train --gpus N`: runs this same program as N processes under `mpirun` on this machine, with
/// `args` (the command line without `--gpus`), and returns mpirun's exit code.
pub fn run_under_mpirun(gpus: usize, args: &[OsString]) -> Result<i32> {
    if !cfg!(feature = "nccl") {
        return Err(Error::InvalidSetting(format!(
            "--gpus {gpus} runs one process a GPU, and this kiln was built without NCCL; rebuild \
             with: cargo build --release --features nccl (CPU processes: mpirun -np N train \
             --device cpu, built with --features mpi)"
        )));
    }
    let program = std::env::current_exe()
        .map_err(|err| Error::InvalidSetting(format!("cannot find this program's path: {err}")))?;
    let mut command = Command::new("mpirun");
    command.arg("-np").arg(gpus.to_string());
    // Open MPI refuses to run as root without being told that it is meant.
    if is_root() {
        command.arg("--allow-run-as-root");
    }
    command.arg(program).args(args);
    command.envs(GPU_ENVIRONMENT);
    // Ctrl-C reaches mpirun and the ranks too (one process group): they checkpoint and stop,
    // and this process waits for them, then exits 130 as a run on one device does. A SIGTERM
    // sent to this process alone is passed on to mpirun.
    let (interrupted, terminated) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    for (signal, flag) in [(SIGINT, &interrupted), (SIGTERM, &terminated)] {
        signal_hook::flag::register(signal, Arc::clone(flag))
            .map_err(|err| Error::InvalidSetting(format!("cannot watch for signals: {err}")))?;
    }
    let mut child = command.spawn().map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            Error::InvalidSetting(format!(
                "--gpus {gpus} starts its processes with mpirun, which is not installed; install \
                 Open MPI (Debian and Ubuntu: apt-get install openmpi-bin) or start the processes \
                 yourself (srun, mpiexec)"
            ))
        } else {
            Error::InvalidSetting(format!("cannot start mpirun: {err}"))
        }
    })?;
    let mut passed_on = false;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|err| Error::InvalidSetting(format!("cannot wait for mpirun: {err}")))?
        {
            break status;
        }
        if terminated.load(Ordering::SeqCst) && !passed_on {
            passed_on = true;
            #[cfg(unix)]
            // SAFETY: kill(2) on our own child, which has not been waited for yet.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if interrupted.load(Ordering::SeqCst) || terminated.load(Ordering::SeqCst) {
        return Ok(130);
    }
    Ok(status.code().unwrap_or(1))
}

fn is_root() -> bool {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
    #[cfg(not(unix))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_launchers_variables_are_read() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(launched_from(env(&[])), None);
        assert_eq!(
            launched_from(env(&[
                ("OMPI_COMM_WORLD_RANK", "1"),
                ("OMPI_COMM_WORLD_SIZE", "4")
            ])),
            Some(Launched {
                rank: 1,
                size: 4,
                launcher: "mpirun"
            })
        );
        assert_eq!(
            launched_from(env(&[("SLURM_PROCID", "3"), ("SLURM_STEP_NUM_TASKS", "8")]))
                .map(|l| (l.rank, l.size)),
            Some((3, 8))
        );
        // An sbatch script's own shell has a rank but no step: not a launch.
        assert_eq!(launched_from(env(&[("SLURM_PROCID", "0")])), None);
        assert_eq!(
            launched_from(env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])),
            None
        );
    }
}
