//! Builds the CUDA kernels in `cuda/` into a static library with nvcc and links it with cudart_static.
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME/bin`, `PATH`, then the project's own `.cuda/` folder (made
//! by `scripts/setup-cuda.sh`). Without nvcc the crate builds CPU-only and every GPU call returns
//! "built without CUDA kernels"; `MOEK_REQUIRE_CUDA=1` turns a missing nvcc into a build error.
//!
//! Environment:
//! - `MOEK_CUDA_ARCHS`: comma-separated targets, default `90a,80` (sm_90a for wgmma/TMA, sm_80 portable).
//! - `MOEK_PTXAS_VERBOSE=1`: print ptxas's whole register/spill report as cargo warnings. By default
//!   the report is written to `$OUT_DIR/ptxas-report.txt` and only spills are warned about.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(moek_cuda)");
    for var in ["NVCC", "CUDA_HOME", "MOEK_CUDA_ARCHS", "MOEK_REQUIRE_CUDA", "MOEK_PTXAS_VERBOSE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=include/moe_kernels.h");

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let require = env::var("MOEK_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc(&manifest) else {
        if require {
            panic!(
                "MOEK_REQUIRE_CUDA=1 but no nvcc was found (NVCC, CUDA_HOME, PATH, .cuda/); run scripts/setup-cuda.sh"
            );
        }
        println!(
            "cargo:warning=moe-kernels: no nvcc found; building WITHOUT CUDA kernels (every GPU call returns \
             MOEK_ERROR_NO_CUDA_KERNELS). Run scripts/setup-cuda.sh or set NVCC/CUDA_HOME."
        );
        return;
    };
    let cuda_root = nvcc.parent().and_then(Path::parent).unwrap().to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let archs = env::var("MOEK_CUDA_ARCHS").unwrap_or_else(|_| "90a,80".to_string());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(manifest.join("cuda"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    // One nvcc per translation unit, in parallel: the sources are independent.
    let jobs: Vec<_> = sources
        .iter()
        .map(|src| {
            let (nvcc, cuda_root, manifest, out, archs) =
                (nvcc.clone(), cuda_root.clone(), manifest.clone(), out.clone(), archs.clone());
            let src = src.clone();
            thread::spawn(move || compile(&nvcc, &cuda_root, &manifest, &out, &archs, &src))
        })
        .collect();
    let mut objects = Vec::new();
    let mut report = String::new();
    for job in jobs {
        let (obj, ptxas) = job.join().unwrap();
        objects.push(obj);
        report.push_str(&ptxas);
    }
    std::fs::write(out.join("ptxas-report.txt"), &report).unwrap();
    let verbose = env::var("MOEK_PTXAS_VERBOSE").is_ok_and(|v| v == "1");
    for line in report.lines() {
        let spills = line.contains("spill stores") && !line.contains(" 0 bytes spill stores");
        if verbose || spills || line.contains("warning") {
            println!("cargo:warning=ptxas: {line}");
        }
    }

    let lib = out.join("libmoek_cuda.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new("ar").arg("crs").arg(&lib).args(&objects).status().expect("running ar");
    assert!(status.success(), "ar failed");

    println!("cargo:rustc-cfg=moek_cuda");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=moek_cuda");
    for dir in ["lib64", "lib", "lib/x64"] {
        if cuda_root.join(dir).join("libcudart_static.a").exists() {
            println!("cargo:rustc-link-search=native={}", cuda_root.join(dir).display());
        }
    }
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["stdc++", "dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}

/// Compiles one `.cu` file; returns the object path and ptxas's resource report.
fn compile(nvcc: &Path, cuda_root: &Path, manifest: &Path, out: &Path, archs: &str, src: &Path) -> (PathBuf, String) {
    let obj = out.join(src.file_stem().unwrap()).with_extension("o");
    let mut cmd = Command::new(nvcc);
    cmd.arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&obj)
        .args(["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "--expt-relaxed-constexpr"])
        .arg(format!("-I{}", manifest.join("include").display()))
        .arg(format!("-I{}", manifest.join("cuda").display()))
        .arg(format!("-I{}", cuda_root.join("include").display()))
        .arg(format!("-I{}", cuda_root.join("include/cccl").display()));
    for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        cmd.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    let output = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        panic!("nvcc failed on {}:\n{stderr}", src.display());
    }
    // Prefix every line with the file, and the kernel (and target) it belongs to, so that a spill
    // warning says where it is.
    let name = src.file_name().unwrap().to_string_lossy();
    let mut function = String::new();
    let mut report = String::new();
    for line in stderr.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            function = rest.replace("' for '", " ").trim_end_matches('\'').to_string();
        }
        report.push_str(&format!("{name}: {function}: {}\n", line.trim()));
    }
    (obj, report)
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exists = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from).and_then(exists) {
        return Some(p);
    }
    if let Some(p) = env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")).and_then(exists) {
        return Some(p);
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()) {
            return Some(p);
        }
    }
    let lib = manifest.join(".cuda/lib");
    let pythons = std::fs::read_dir(lib).ok()?;
    pythons.filter_map(|e| e.ok()).map(|e| e.path().join("site-packages/nvidia/cu13/bin/nvcc")).find(|p| p.is_file())
}
