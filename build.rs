//! Sets the `kiln_metal` cfg where the build has candle's Metal back end: with `--features
//! metal`, and by default on Apple Silicon (Cargo.toml's target dependencies). With the `cuda`
//! feature, compiles kiln's CUDA kernels to PTX with nvcc, as candle-kernels does; the driver finishes the compile for the GPU it runs on. A CPU build needs no CUDA at
//! all. src/ops/kernels.cu includes each group's .cu file (beside the Rust that launches it), so
//! the kernels build as one PTX module.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(kiln_metal)");
    let target = |key: &str| std::env::var(key).unwrap_or_default();
    let apple_silicon =
        target("CARGO_CFG_TARGET_OS") == "macos" && target("CARGO_CFG_TARGET_ARCH") == "aarch64";
    if apple_silicon || std::env::var_os("CARGO_FEATURE_METAL").is_some() {
        println!("cargo:rustc-cfg=kiln_metal");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let source = "src/ops/kernels.cu";
    // Every file the module includes: a change to any of them rebuilds the PTX.
    let mut kernel_files = Vec::new();
    cuda_sources(Path::new("src"), &mut kernel_files);
    kernel_files.sort();
    for file in &kernel_files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    // PTX for this virtual architecture runs on it and every newer GPU (default: Volta, 7.0).
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "70".to_string());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kiln.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(source)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{nvcc}` failed ({s}) compiling {source}"),
        Err(e) => panic!(
            "the `cuda` feature needs NVIDIA's CUDA compiler: cannot run `{nvcc}` ({e}). \
             Install the CUDA toolkit and put nvcc on PATH (or set NVCC)"
        ),
    }
}

/// The .cu and .cuh files under `dir`, at any depth.
fn cuda_sources(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {} for CUDA sources: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {} for CUDA sources: {e}", dir.display()))
            .path();
        if path.is_dir() {
            cuda_sources(&path, found);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "cu" || ext == "cuh")
        {
            found.push(path);
        }
    }
}
