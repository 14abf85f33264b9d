//! Links the system UCX (pkg-config `ucx`, at least 1.12 for `ucp_request_param_t::memh`) and
//! compiles `src/layout.c`, which reports the headers' sizes, offsets and constants so the
//! tests can check the hand-written bindings against them.

fn main() {
    println!("cargo:rerun-if-changed=src/layout.c");
    let lib = match pkg_config::Config::new()
        .atleast_version("1.12")
        .probe("ucx")
    {
        Ok(lib) => lib,
        Err(e) => {
            println!("cargo:warning=UCX not found through pkg-config (install libucx-dev): {e}");
            std::process::exit(1);
        }
    };
    let mut build = cc::Build::new();
    build.file("src/layout.c");
    for p in &lib.include_paths {
        build.include(p);
    }
    build.compile("ucx_sys_layout");
}
