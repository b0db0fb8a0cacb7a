//! How the executable is linked on Linux (see `build.rs`): at a fixed address, and with the
//! code one echoed message runs placed side by side at the start of the code.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_shoal");

/// Why the checks do not apply to this build, if they do not.
fn not_applicable(opt_out: &str) -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("not Linux".to_owned());
    }
    std::env::var_os(opt_out).map(|_| format!("{opt_out} is set"))
}

#[test]
fn the_executable_is_linked_at_a_fixed_address() {
    if let Some(why) = not_applicable("SHOAL_PIE") {
        eprintln!("skipped: {why}");
        return;
    }
    let bytes = std::fs::read(BIN).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    let e_type = u16::from_le_bytes([bytes[16], bytes[17]]);
    assert_eq!(e_type, 2, "ET_EXEC (a PIE is ET_DYN, 3)");
}

#[test]
fn the_code_of_one_message_sits_together_at_the_start_of_the_code() {
    if let Some(why) = not_applicable("SHOAL_HOT_TEXT") {
        eprintln!("skipped: {why}");
        return;
    }
    let (Ok(sections), Ok(symbols)) = (
        Command::new("readelf").args(["-S", "-W", BIN]).output(),
        Command::new("nm").args(["-C", BIN]).output(),
    ) else {
        eprintln!("skipped: readelf and nm (binutils) are needed");
        return;
    };
    let sections = String::from_utf8_lossy(&sections.stdout);
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
    let (start, size) = sections
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == ".text.shoal_hot")?;
            Some((hex(f[i + 2]), hex(f[i + 4])))
        })
        .expect("a .text.shoal_hot section (scripts/hot-text.ld)");
    // Most of one message's code, not whole families of generic copies.
    assert!(
        (32 << 10..512 << 10).contains(&size),
        "hot code of {size} bytes: regenerate scripts/hot-text.ld"
    );
    let symbols = String::from_utf8_lossy(&symbols.stdout);
    for name in [
        "shoal::store::jsonl::recv::receive",
        "<shoal::store::jsonl::JsonlStore as shoal::store::Store>::append",
        "shoal::envelope::Envelope::parse",
        "shoal::bus::Bus::wait_loop",
        "shoal::cli::bus::echo",
    ] {
        let at = symbols
            .lines()
            .find_map(|l| {
                let (addr, rest) = l.split_once(' ')?;
                let sym = rest.get(2..)?; // after the type letter
                let bare = sym.split_once("::h").map_or(sym, |(n, _)| n); // older nm keep the hash
                (bare == name).then(|| hex(addr))
            })
            .unwrap_or_else(|| panic!("no symbol {name}"));
        assert!(
            (start..start + size).contains(&at),
            "{name} at {at:#x} is outside the hot code {start:#x}+{size:#x}: \
             regenerate scripts/hot-text.ld (scripts/echo-footprint.sh --layout)"
        );
    }
}
