//! Builds the test double of the CUDA driver (fake-cuda/fake_cuda.c) into
//! `$OUT_DIR/fake-cuda/libcuda.so{,.1}`; the tests run GPU paths under it with
//! `LD_LIBRARY_PATH` pointing there (`LLUMLET_FAKE_CUDA_DIR`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "fake-cuda/fake_cuda.c";
    println!("cargo:rerun-if-changed={src}");
    let dir =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fake-cuda");
    std::fs::create_dir_all(&dir).expect("create the fake-cuda directory");
    let lib = dir.join("libcuda.so.1");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"])
        .arg("-Wl,-soname,libcuda.so.1")
        .arg("-o")
        .arg(&lib)
        .arg(src)
        .arg("-lpthread")
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!(
            "cannot build the test double of libcuda with {cc} ({other:?}): install a C compiler (scripts/test.sh installs gcc)"
        ),
    }
    let link = dir.join("libcuda.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("libcuda.so.1", &link).expect("link libcuda.so");
    println!("cargo:rustc-env=LLUMLET_FAKE_CUDA_DIR={}", dir.display());
}
