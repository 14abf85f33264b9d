//! `llumlet`: see `llumlet --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    llumlet_tools::cli::main()
}
