//! Generates `include/llumlet.h` from the crate's `extern "C"` items with cbindgen. The file is
//! rewritten only when its content changes.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    // The C struct llumlet_status is the data plane's StatusCounters.
    println!("cargo:rerun-if-changed=../dataplane/src/status_ring.rs");
    let config =
        cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("ffi/cbindgen.toml");
    let bindings = match cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
    {
        Ok(b) => b,
        Err(e) => panic!("cbindgen failed: {e}"),
    };
    let mut out = Vec::new();
    bindings.write(&mut out);
    let path = format!("{dir}/include/llumlet.h");
    if std::fs::read(&path).ok().as_deref() != Some(&out[..]) {
        std::fs::write(&path, out).expect("write include/llumlet.h");
    }
}
