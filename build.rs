//! Link the `shoal` executable as a fixed-address (non-PIE) program on Linux.
//!
//! A position-independent executable is relocated when it starts: every page of pointers
//! into the program (vtables, tables of string slices, formatting pieces) becomes a private
//! copy in each process. With hundreds of agent processes each waking for one message, those
//! private pages are cold in the cache at every wake-up; linked at a fixed address they stay
//! shared by all processes, and warm. Measured with `shoal bench round` (2-core machine, PIE
//! and non-PIE builds of the same code alternating): flat rounds 2.6-3.0x the floor as a PIE,
//! 2.1-2.25x linked non-PIE (1000 agents: 29-33 ms -> 24-28 ms; 100 agents: 2.1-2.3 ms ->
//! 1.4-1.8 ms). The code is still compiled position-independent (proc-macros need that from
//! the same flags), only the final link differs; shared libraries keep their random
//! addresses. `SHOAL_PIE=1 cargo build` links a PIE.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" && std::env::var_os("SHOAL_PIE").is_none() {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    println!("cargo:rerun-if-env-changed=SHOAL_PIE");
}
