//! # shoal
//!
//! Hundreds of local processes ("agents") coordinating through files on tmpfs. Agents exchange
//! JSON messages through sharded, `flock`-guarded JSONL inboxes under `/dev/shm`, and wake on
//! delivery instead of polling.
//!
//! * Nothing is lost or silently dropped: delivery is at-least-once with leases and explicit
//!   acknowledgement; every limit (payload cap, inbox quota, full filesystem) is an error.
//! * A send costs one `flock`, one `write` and one unlock; a waiting receiver costs no CPU.
//!
//! ## Layers
//!
//! [`bus`] (send, receive, acknowledge) sits on [`store`] (inbox layouts behind the [`Store`]
//! trait) and [`wake`] (wake-ups), which sit on [`journal`] (the one append primitive),
//! [`layout`] (every path under the root), [`envelope`] (wire types) and [`sys`] (OS calls and
//! all `unsafe`). Arrows only point down.
//!
//! ## Example: two agents
//!
//! A receiver blocks until a message arrives; here it runs on a thread, but it could as well be
//! another process: `shoal recv bob --wait`, or `examples/pingpong.rs`, which runs a copy of
//! itself as the second agent.
//!
//! ```
//! use shoal::{AgentId, Bus, RecvOptions, Wait};
//! use std::time::Duration;
//!
//! # let dir = std::path::PathBuf::from(format!("/dev/shm/shoal-doc-lib-{}", std::process::id()));
//! let bus = Bus::create(&dir)?; // or Bus::open_default(): /dev/shm/shoal-<uid>
//! let (alice, bob) = (AgentId::new("alice")?, AgentId::new("bob")?);
//! bus.init(&alice)?;
//! bus.init(&bob)?;
//!
//! let receiver = {
//!     let (bus, bob) = (bus.clone(), bob.clone());
//!     std::thread::spawn(move || {
//!         let opts = RecvOptions { wait: Wait::For(Duration::from_secs(10)), ..Default::default() };
//!         let msgs = bus.recv(&bob, &opts).unwrap();
//!         bus.ack_all(&bob).unwrap();
//!         msgs
//!     })
//! };
//! bus.send_json(&alice, &bob, "greeting", &serde_json::json!({"text": "hi"}))?;
//! let msgs = receiver.join().unwrap();
//! assert_eq!(msgs[0].kind, "greeting");
//! assert_eq!(msgs[0].seq, 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod agents;
pub mod bus;
pub mod compat;
pub mod coord;
pub mod envelope;
pub mod journal;
pub mod layout;
pub mod liveness;
pub mod obs;
pub mod root;
pub mod store;
pub mod sys;
pub mod wake;

pub use bus::{Bus, DEFAULT_LEASE, OpenError, RecvOptions, SendOptions, Wait};
pub use envelope::{AgentId, Envelope, Payload};
pub use layout::LayoutKind;
pub use root::{Root, RootError};
pub use store::{Activity, Depth, Receipt, RecvError, SendError, Store};
