//! The journal primitive alone: lock + append (trusted length) + unlock, N times.
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let path =
        std::path::PathBuf::from(format!("/dev/shm/shoal-journalloop-{}", std::process::id()));
    let j = shoal::journal::Journal::open(&path, true).unwrap();
    let mut rec = vec![b'x'; 199];
    rec.push(b'\n');
    let mut len = 0;
    for _ in 0..n {
        let mut g = j.lock().unwrap();
        len = g.append(&rec, Some(len)).unwrap().end;
    }
    std::fs::remove_file(&path).unwrap();
}
