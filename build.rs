//! How the `shoal` executable is linked on Linux: at a fixed address, with its hot path's code
//! side by side.
//!
//! **Non-PIE.** A position-independent executable is relocated when it starts: every page of
//! pointers into the program (vtables, tables of string slices, formatting pieces) becomes a
//! private copy in each process. With hundreds of agent processes each waking for one
//! message, those private pages are cold in the cache at every wake-up; linked at a fixed
//! address they stay shared by all processes, and warm. Measured with `shoal bench round`
//! (2-core machine, PIE and non-PIE builds of the same code alternating): flat rounds
//! 2.6-3.0x the floor as a PIE, 2.1-2.25x linked non-PIE (1000 agents: 29-33 ms -> 24-28 ms;
//! 100 agents: 2.1-2.3 ms -> 1.4-1.8 ms). The code is still compiled position-independent
//! (proc-macros need that from the same flags), only the final link differs; shared libraries
//! keep their random addresses. `SHOAL_PIE=1 cargo build` links a PIE.
//!
//! **Hot code together.** The functions one echoed message runs (`scripts/hot-text.ld`,
//! written by `scripts/echo-footprint.sh --layout`) are placed first, in the order they run:
//! one message's code then spans about 40 pages instead of about 60 spread over 2.5 MB, and
//! each page is an instruction-TLB miss in a process woken cold. The patterns name functions
//! without the hashes that change between builds; a function renamed simply falls back to
//! the default place. `SHOAL_HOT_TEXT=0 cargo build` links without it.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=scripts/hot-text.ld");
    println!("cargo:rerun-if-env-changed=SHOAL_PIE");
    println!("cargo:rerun-if-env-changed=SHOAL_HOT_TEXT");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        return;
    }
    if std::env::var_os("SHOAL_PIE").is_none() {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    if std::env::var("SHOAL_HOT_TEXT").as_deref() != Ok("0") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/scripts/hot-text.ld");
    }
}
