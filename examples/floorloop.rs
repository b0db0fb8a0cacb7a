//! The raw floor: flock + one 200-byte write + unlock, N times (compare with sendloop).
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let path = format!("/dev/shm/shoal-floorloop-{}", std::process::id());
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    let mut rec = vec![b'x'; 199];
    rec.push(b'\n');
    for _ in 0..n {
        f.lock().unwrap();
        (&f).write_all(&rec).unwrap();
        f.unlock().unwrap();
    }
    std::fs::remove_file(&path).unwrap();
}
