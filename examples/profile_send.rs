//! Send N 200-byte messages in a loop, for `perf`/`strace`/`time`: compare the library send
//! with the journal primitive alone and with the raw floor (flock + write + unlock).
//!
//! ```text
//! cargo build --release --examples
//! time target/release/examples/profile_send floor 1000000
//! time target/release/examples/profile_send journal 1000000
//! time target/release/examples/profile_send send 1000000
//! strace -c target/release/examples/profile_send send 100000   # 3 syscalls per send
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "send".to_owned());
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = PathBuf::from(format!("/dev/shm/shoal-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut record = vec![b'x'; 199];
    record.push(b'\n');
    match mode.as_str() {
        "floor" => {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(dir.join("floor"))
                .unwrap();
            for _ in 0..n {
                f.lock().unwrap();
                (&f).write_all(&record).unwrap();
                f.unlock().unwrap();
            }
        }
        "journal" => {
            let j = shoal::journal::Journal::open(&dir.join("journal"), true).unwrap();
            let mut len = 0;
            for _ in 0..n {
                len = j.lock().unwrap().append(&record, Some(len)).unwrap().end;
            }
        }
        "send" => {
            let bus = shoal::Bus::create(&dir.join("root")).unwrap();
            let (a, b) = (
                shoal::AgentId::new("alice").unwrap(),
                shoal::AgentId::new("bob").unwrap(),
            );
            let mut settings = bus.default_settings();
            settings.quota_msgs = u64::MAX;
            settings.quota_bytes = u64::MAX;
            bus.init_with(&b, &settings).unwrap();
            // With these ids the stored line is about 200 bytes.
            let p = shoal::Payload::parse(&format!("{{\"data\":\"{}\"}}", "p".repeat(57)), 1 << 20)
                .unwrap();
            for _ in 0..n {
                bus.send(&a, &b, "bench", &p).unwrap();
            }
        }
        other => {
            eprintln!("unknown mode {other:?}: use floor, journal or send");
            std::process::exit(2);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
