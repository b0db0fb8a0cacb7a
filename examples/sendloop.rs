//! Send N messages in a loop (used to inspect the send path's system calls).
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir = std::path::PathBuf::from(format!("/dev/shm/shoal-sendloop-{}", std::process::id()));
    let bus = shoal::Bus::create(&dir).unwrap();
    let (a, b) = (
        shoal::AgentId::new("alice").unwrap(),
        shoal::AgentId::new("bob").unwrap(),
    );
    let mut settings = bus.default_settings();
    settings.quota_msgs = u64::MAX;
    settings.quota_bytes = u64::MAX;
    bus.init_with(&b, &settings).unwrap();
    let p = shoal::Payload::parse(
        "{\"data\":\"ppppppppppppppppppppppppppppppppppppppppppppppppppppppppp\"}",
        1 << 20,
    )
    .unwrap();
    for _ in 0..n {
        bus.send(&a, &b, "bench", &p).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
