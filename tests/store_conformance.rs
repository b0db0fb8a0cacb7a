//! One conformance suite for every `Store` implementation, driven through the library API.
//! A new layout joins by adding a line to `layouts()`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::TestRoot;
use shoal::store::{AgentSettings, Filter, SendError};
use shoal::{AgentId, Bus, LayoutKind, Payload, RecvOptions, Root, SendOptions, Wait};

fn layouts() -> Vec<LayoutKind> {
    vec![LayoutKind::Jsonl, LayoutKind::Compat]
}

/// Run `f` once per layout, each on a fresh root.
fn each_layout(tag: &str, f: impl Fn(&Bus, &TestRoot)) {
    for kind in layouts() {
        let t = TestRoot::new(&format!("{tag}-{kind}"));
        let bus = Bus::open(Root::create(&t.root(), kind).unwrap()).unwrap();
        f(&bus, &t);
    }
}

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn opts(max: usize, lease_ms: u64) -> RecvOptions<'static> {
    RecvOptions {
        max,
        lease: Duration::from_millis(lease_ms),
        wait: Wait::No,
        filter: None,
    }
}

#[test]
fn r2_round_trip_keeps_every_field() {
    each_layout("roundtrip", |bus, _| {
        let (a, b) = (id("alice"), id("bob"));
        bus.init(&b).unwrap();
        let payload = Payload::parse(r#"{"text": "héllo \"q\"", "n": [1, 2]}"#, 1 << 20).unwrap();
        let route = vec!["alice".to_owned(), "hub-0".to_owned()];
        let r = bus
            .send_with(
                &a,
                &b,
                "greet",
                &payload,
                &SendOptions {
                    reply_to: Some("msg-1-2"),
                    route: Some(&route),
                    ..SendOptions::default()
                },
            )
            .unwrap();
        let got = bus.recv(&b, &opts(10, 30_000)).unwrap();
        assert_eq!(got.len(), 1);
        let m = &got[0];
        assert_eq!(m.id, r.id);
        assert_eq!(
            (m.from.as_str(), m.to.as_str(), m.kind.as_str()),
            ("alice", "bob", "greet")
        );
        assert_eq!(m.seq, 1);
        assert_eq!(m.payload.get(), payload.as_str(), "payload byte for byte");
        assert_eq!(m.reply_to.as_deref(), Some("msg-1-2"));
        assert_eq!(m.route.as_deref(), Some(&route[..]));
        assert_eq!(m.delivery, Some(1));
        assert_eq!(m.v, 1);
        assert!(m.ts > 1_700_000_000_000_000, "ts is in microseconds");
    });
}

#[test]
fn r2_sequences_count_per_pair() {
    each_layout("seq", |bus, _| {
        let (a, c, b) = (id("a"), id("c"), id("b"));
        bus.init(&b).unwrap();
        for _ in 0..3 {
            bus.send_str(&a, &b, "t", "1").unwrap();
            bus.send_str(&c, &b, "t", "2").unwrap();
        }
        let got = bus.recv(&b, &opts(100, 30_000)).unwrap();
        let per: Vec<(String, u64)> = got.iter().map(|m| (m.from.clone(), m.seq)).collect();
        let a_seqs: Vec<u64> = per.iter().filter(|(f, _)| f == "a").map(|p| p.1).collect();
        let c_seqs: Vec<u64> = per.iter().filter(|(f, _)| f == "c").map(|p| p.1).collect();
        assert_eq!(a_seqs, [1, 2, 3]);
        assert_eq!(c_seqs, [1, 2, 3]);
        // Oldest first across senders.
        let ts: Vec<u64> = got.iter().map(|m| m.ts).collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    });
}

#[test]
fn r2_unknown_recipient_is_an_error() {
    each_layout("unknown", |bus, _| {
        let e = bus
            .send_str(&id("a"), &id("nobody"), "t", "{}")
            .unwrap_err();
        assert!(
            matches!(e, SendError::UnknownRecipient(ref r) if r.as_str() == "nobody"),
            "{e}"
        );
    });
}

#[test]
fn r2_unacknowledged_messages_come_back_after_the_lease() {
    each_layout("lease", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        let sent: Vec<String> = (0..3)
            .map(|i| bus.send_str(&a, &b, "t", &i.to_string()).unwrap().id)
            .collect();
        let first = bus.recv(&b, &opts(10, 50)).unwrap();
        assert_eq!(first.len(), 3);
        assert!(
            bus.recv(&b, &opts(10, 50)).unwrap().is_empty(),
            "leased messages are not handed out twice"
        );
        bus.ack(&b, &sent[1..2]).unwrap();
        std::thread::sleep(Duration::from_millis(80));
        let again = bus.recv(&b, &opts(10, 50)).unwrap();
        let ids: Vec<&str> = again.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(
            ids,
            [sent[0].as_str(), sent[2].as_str()],
            "acknowledged one never comes back"
        );
        assert!(again.iter().all(|m| m.delivery == Some(2)));
        assert_eq!(again[0].payload.get(), "0");
        let r = bus
            .ack(
                &b,
                &[sent[0].clone(), "msg-0-0".to_owned(), sent[1].clone()],
            )
            .unwrap();
        assert_eq!(r.acked, 1);
        assert_eq!(r.unknown, vec!["msg-0-0".to_owned(), sent[1].clone()]);
    });
}

#[test]
fn r2_a_consuming_handler_acknowledges_what_it_takes_and_leases_what_it_refuses() {
    each_layout("consume", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        let sent: Vec<String> = (0..2)
            .map(|i| bus.send_str(&a, &b, "t", &i.to_string()).unwrap().id)
            .collect();
        // Refused: leased like a plain receive, handed out again once the lease ends.
        let refused = bus
            .consume_with(&b, &opts(10, 50), &mut None, &mut |_| false)
            .unwrap();
        assert_eq!(refused.len(), 2);
        assert!(
            bus.recv(&b, &opts(10, 50)).unwrap().is_empty(),
            "refused messages are leased"
        );
        assert_eq!(bus.depth(&b).unwrap().msgs, 2);
        std::thread::sleep(Duration::from_millis(80));
        // One batch of the two redelivered and a new one, all taken.
        let third = bus.send_str(&a, &b, "t", "2").unwrap().id;
        let mut seen = Vec::new();
        let taken = bus
            .consume_with(&b, &opts(10, 50), &mut None, &mut |batch| {
                seen.extend(batch.iter().map(|m| (m.id.clone(), m.delivery)));
                true
            })
            .unwrap();
        assert_eq!(taken.len(), 3);
        assert_eq!(
            seen,
            [
                (sent[0].clone(), Some(2)),
                (sent[1].clone(), Some(2)),
                (third.clone(), Some(1))
            ]
        );
        assert_eq!(
            bus.depth(&b).unwrap().msgs,
            0,
            "taken messages are acknowledged"
        );
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            bus.recv(&b, &opts(10, 50)).unwrap().is_empty(),
            "taken messages never come back"
        );
        let r = bus.ack(&b, std::slice::from_ref(&third)).unwrap();
        assert_eq!(
            (r.acked, r.unknown),
            (0, vec![third]),
            "no lease is left over"
        );
        // Taken on first delivery, past a message left by a filter: acknowledged out of order.
        let x = bus.send_str(&a, &b, "x", "3").unwrap().id;
        let y = bus.send_str(&a, &b, "y", "4").unwrap().id;
        let only_y = |e: &shoal::Envelope| e.kind == "y";
        let filtered = RecvOptions {
            filter: Some(Filter(&only_y)),
            ..opts(10, 30_000)
        };
        let got = bus
            .consume_with(&b, &filtered, &mut None, &mut |_| true)
            .unwrap();
        assert_eq!(got.iter().map(|m| &m.id).collect::<Vec<_>>(), [&y]);
        let rest = bus.recv(&b, &opts(10, 30_000)).unwrap();
        assert_eq!(rest.iter().map(|m| &m.id).collect::<Vec<_>>(), [&x]);
        bus.ack_all(&b).unwrap();
        assert_eq!(bus.depth(&b).unwrap().msgs, 0);
        assert!(bus.recv(&b, &opts(10, 30_000)).unwrap().is_empty());
    });
}

#[test]
fn r2_ack_all_covers_only_delivered_messages() {
    each_layout("ackall", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        for i in 0..5 {
            bus.send_str(&a, &b, "t", &i.to_string()).unwrap();
        }
        assert_eq!(bus.recv(&b, &opts(2, 30_000)).unwrap().len(), 2);
        assert_eq!(bus.ack_all(&b).unwrap().acked, 2);
        let rest = bus.recv(&b, &opts(10, 30_000)).unwrap();
        let payloads: Vec<&str> = rest.iter().map(|m| m.payload.get()).collect();
        assert_eq!(payloads, ["2", "3", "4"]);
        assert_eq!(bus.depth(&b).unwrap().msgs, 3);
        bus.ack_all(&b).unwrap();
        assert_eq!(bus.depth(&b).unwrap().msgs, 0);
    });
}

#[test]
fn r2_peek_all_and_clear_remove_exactly_what_was_seen() {
    each_layout("peek", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        let store = bus.store();
        for i in 0..3 {
            bus.send_str(&a, &b, "t", &i.to_string()).unwrap();
        }
        assert_eq!(
            bus.recv(&b, &opts(1, 30_000)).unwrap().len(),
            1,
            "one leased"
        );
        let seen = store.peek_all(&b).unwrap();
        assert_eq!(seen.len(), 3, "peek shows leased and unleased messages");
        assert_eq!(
            store.peek_all(&b).unwrap().len(),
            3,
            "peek does not consume"
        );
        let late = bus.send_str(&a, &b, "t", "\"late\"").unwrap();
        assert_eq!(store.clear(&b).unwrap(), 3);
        let left = store.peek_all(&b).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].id, late.id,
            "clear never removes a message that arrived later"
        );
        assert_eq!(store.clear(&b).unwrap(), 1);
        assert_eq!(
            store.clear(&b).unwrap(),
            0,
            "no snapshot: clears all, which is nothing"
        );
        assert_eq!(bus.depth(&b).unwrap().msgs, 0);
    });
}

#[test]
fn r2_counts_sent_and_lists_agents() {
    each_layout("counts", |bus, _| {
        let store = bus.store();
        for n in ["zed", "amy", "bob"] {
            bus.init(&id(n)).unwrap();
        }
        assert!(!bus.init(&id("bob")).unwrap(), "init is idempotent");
        let names: Vec<String> = store
            .agents()
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(names, ["amy", "bob", "zed"]);
        for _ in 0..4 {
            bus.send_str(&id("amy"), &id("bob"), "t", "{}").unwrap();
        }
        bus.send_str(&id("stranger"), &id("bob"), "t", "{}")
            .unwrap();
        assert_eq!(store.sent_count(&id("amy")).unwrap(), 4);
        assert_eq!(store.sent_count(&id("bob")).unwrap(), 0);
        assert_eq!(bus.depth(&id("bob")).unwrap().msgs, 5);
        assert!(bus.depth(&id("bob")).unwrap().bytes > 0);
        let removed = bus.remove(&id("bob")).unwrap().unwrap();
        assert_eq!((removed.inbox, removed.sent), (5, 0));
        assert!(bus.remove(&id("bob")).unwrap().is_none());
        assert!(!store.agent_exists(&id("bob")));
    });
}

/// Listings of the agents directory are reused while it is unchanged: one made long after the
/// last change, then agents created and removed, by this handle and by another.
#[test]
fn r2_a_reused_agent_listing_still_sees_every_change() {
    each_layout("listing", |bus, t| {
        let dir = bus.root().layout().agents_dir();
        let age = |secs| {
            let then = std::time::SystemTime::now() - Duration::from_secs(secs);
            std::fs::File::open(&dir)
                .unwrap()
                .set_modified(then)
                .unwrap();
        };
        let names = |b: &Bus| -> Vec<String> {
            let ids = b.store().agents().unwrap();
            ids.iter().map(|a| a.to_string()).collect()
        };
        let other = Bus::open(Root::open(&t.root()).unwrap()).unwrap();
        bus.init(&id("a")).unwrap();
        bus.init(&id("b")).unwrap();
        age(60);
        assert_eq!(names(bus), ["a", "b"]);
        assert_eq!(names(bus), ["a", "b"], "the settled listing, reused");
        other.init(&id("c")).unwrap();
        assert_eq!(names(bus), ["a", "b", "c"], "created by another handle");
        age(60);
        assert_eq!(names(bus), ["a", "b", "c"]);
        other.remove(&id("a")).unwrap();
        assert_eq!(names(bus), ["b", "c"], "removed by another handle");
        // A change whose directory time is then put back to what it was (a restore, `touch
        // -r`): the change time still tells.
        age(60);
        let listed_at = std::fs::metadata(&dir).unwrap().modified().unwrap();
        assert_eq!(names(bus), ["b", "c"]);
        other.init(&id("e")).unwrap();
        std::fs::File::open(&dir)
            .unwrap()
            .set_modified(listed_at)
            .unwrap();
        assert_eq!(names(bus), ["b", "c", "e"], "time put back");
        other.remove(&id("e")).unwrap();
        // A change right after a listing, within the clock's tick: still seen.
        assert_eq!(names(&other), ["b", "c"]);
        bus.init(&id("d")).unwrap();
        assert_eq!(names(&other), ["b", "c", "d"]);
    });
}

#[test]
fn r2_removal_and_recreation_are_seen_by_other_handles() {
    each_layout("recreate", |bus, t| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        // A second, independent handle on the same root (as another process would have).
        let other = Bus::open(Root::open(&t.root()).unwrap()).unwrap();
        other.send_str(&a, &b, "t", "1").unwrap(); // caches b's inbox
        bus.remove(&b).unwrap();
        let e = other.send_str(&a, &b, "t", "2").unwrap_err();
        assert!(
            matches!(e, SendError::UnknownRecipient(_)),
            "send into a removed inbox: {e}"
        );
        bus.init(&b).unwrap();
        let r = other.send_str(&a, &b, "t", "3").unwrap();
        let got = bus.recv(&b, &opts(10, 30_000)).unwrap();
        assert_eq!(
            got.len(),
            1,
            "the message reached the new inbox, not the deleted one"
        );
        assert_eq!(got[0].id, r.id);
        assert_eq!(got[0].seq, 1, "a new agent starts a new sequence");
    });
}

#[test]
fn r2_quota_refuses_and_evicts_nothing() {
    each_layout("quota", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        let settings = AgentSettings {
            quota_msgs: 5,
            ..bus.default_settings()
        };
        bus.init_with(&b, &settings).unwrap();
        let sent: Vec<String> = (0..5)
            .map(|i| bus.send_str(&a, &b, "t", &i.to_string()).unwrap().id)
            .collect();
        let e = bus.send_str(&a, &b, "t", "5").unwrap_err();
        assert!(
            matches!(
                e,
                SendError::QuotaExceeded {
                    pending_msgs: 5,
                    quota_msgs: 5,
                    ..
                }
            ),
            "{e}"
        );
        let all: Vec<String> = bus
            .store()
            .peek_all(&b)
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(all, sent, "nothing evicted");
        // Consuming makes room again; the refused message did not take a sequence number.
        bus.recv(&b, &opts(2, 30_000)).unwrap();
        bus.ack_all(&b).unwrap();
        assert_eq!(bus.send_str(&a, &b, "t", "5").unwrap().seq, 6);
    });
}

#[test]
fn r2_threads_sharing_one_bus_keep_order_and_lose_nothing() {
    each_layout("threads", |bus, _| {
        let b = id("b");
        let settings = AgentSettings {
            quota_msgs: u64::MAX,
            quota_bytes: u64::MAX,
            ..bus.default_settings()
        };
        bus.init_with(&b, &settings).unwrap();
        const THREADS: usize = 8;
        const EACH: usize = 2_000;
        // Two threads per sender id: flock does not exclude threads of one process, the
        // store's own locks must.
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (bus, b) = (bus.clone(), b.clone());
                std::thread::spawn(move || {
                    let from = id(&format!("s{}", t / 2));
                    for i in 0..EACH {
                        bus.send_json(&from, &b, "t", &serde_json::json!({"t": t, "i": i}))
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut got = Vec::new();
        loop {
            let batch = bus.recv(&b, &opts(5_000, 30_000)).unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(batch);
            bus.ack_all(&b).unwrap();
        }
        assert_eq!(got.len(), THREADS * EACH);
        let mut next_seq: HashMap<String, u64> = HashMap::new();
        let mut next_i: HashMap<u64, u64> = HashMap::new();
        for m in &got {
            let s = next_seq.entry(m.from.clone()).or_insert(1);
            assert_eq!(m.seq, *s, "sender {}: sequence gap or reorder", m.from);
            *s += 1;
            let v: serde_json::Value = serde_json::from_str(m.payload.get()).unwrap();
            let (t, i) = (v["t"].as_u64().unwrap(), v["i"].as_u64().unwrap());
            let n = next_i.entry(t).or_insert(0);
            assert_eq!(i, *n, "thread {t}: its messages out of order");
            *n += 1;
        }
    });
}

#[test]
fn r2_a_waiting_receiver_is_woken_by_a_send() {
    each_layout("wait", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        let bus2 = bus.clone();
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || {
            let o = RecvOptions {
                wait: Wait::For(Duration::from_secs(30)),
                ..RecvOptions::default()
            };
            bus2.recv(&b2, &o).unwrap()
        });
        std::thread::sleep(Duration::from_millis(50));
        let r = bus.send_str(&a, &b, "t", "{}").unwrap();
        let got = waiter.join().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, r.id);
        // A timed wait on an empty inbox returns empty.
        let o = RecvOptions {
            wait: Wait::For(Duration::from_millis(30)),
            ..RecvOptions::default()
        };
        bus.ack_all(&b).unwrap();
        assert!(bus.recv(&b, &o).unwrap().is_empty());
    });
}

#[test]
fn r4_filtered_receive_takes_one_message_and_leaves_the_rest() {
    each_layout("filter", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        let sent: Vec<String> = (0..5)
            .map(|i| bus.send_str(&a, &b, "t", &i.to_string()).unwrap().id)
            .collect();
        let want = sent[3].clone();
        let f = move |e: &shoal::Envelope| e.id == want;
        let o = RecvOptions {
            filter: Some(Filter(&f)),
            ..opts(10, 30_000)
        };
        let got = bus.recv(&b, &o).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, sent[3]);
        bus.ack(&b, &[sent[3].clone()]).unwrap();
        // The others are untouched and come in order; the picked one never again.
        let rest: Vec<String> = bus
            .recv(&b, &opts(10, 30_000))
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(
            rest,
            [&sent[0], &sent[1], &sent[2], &sent[4]].map(String::clone)
        );
        bus.ack_all(&b).unwrap();
        assert_eq!(bus.depth(&b).unwrap().msgs, 0);
        assert!(bus.recv(&b, &opts(10, 30_000)).unwrap().is_empty());
    });
}

/// Send from `a` to `b` through the hub "hub" (written to its inbox, numbered in `b`'s
/// sequence), at the time given or now.
fn send_via_hub(
    bus: &Bus,
    a: &AgentId,
    b: &AgentId,
    payload: &str,
    ts: Option<u64>,
) -> shoal::Receipt {
    let route = vec![a.to_string()];
    bus.send_with(
        a,
        b,
        "t",
        &Payload::parse(payload, 100).unwrap(),
        &SendOptions {
            via: Some(&id("hub")),
            route: Some(&route),
            ts,
            ..SendOptions::default()
        },
    )
    .unwrap()
}

/// Pass messages from `a` to `b` on as the hub "hub" does: same id, send time and sequence,
/// the hub added to the route.
fn forward_as_hub(bus: &Bus, a: &AgentId, b: &AgentId, msgs: &[shoal::Envelope]) {
    let hops = vec![a.to_string(), "hub".to_owned()];
    for m in msgs {
        bus.send_with(
            a,
            b,
            &m.kind,
            &Payload::parse(m.payload.get(), 100).unwrap(),
            &SendOptions {
                id: Some(&m.id),
                ts: Some(m.ts),
                seq: Some(m.seq),
                route: Some(&hops),
                ..SendOptions::default()
            },
        )
        .unwrap();
    }
}

/// One sender id used by two processes can number its messages in one order and stamp them in
/// the other (each takes its time before the shard lock). A hub that dies holding the first
/// and comes back must still pass them on in sequence order: forwarded the other way round,
/// the receiver takes the first for a copy of what it already has, and it is lost.
#[test]
fn r4_a_restarted_hub_forwards_in_sequence_order_whatever_the_send_times() {
    each_layout("redeliver-order", |bus, _| {
        let (a, hub, b) = (id("a"), id("hub"), id("b"));
        bus.init(&hub).unwrap();
        bus.init(&b).unwrap();
        let via = |p: &str, ts: u64| send_via_hub(bus, &a, &b, p, Some(ts));
        let now = shoal::envelope::now_micros();
        let first = via("1", now + 200); // numbered first, stamped later
        // The hub takes it, and dies holding it (its lease runs out).
        let held = bus.recv(&hub, &opts(1, 1)).unwrap();
        assert_eq!(held.len(), 1);
        let second = via("2", now + 100);
        assert_eq!((first.seq, second.seq), (1, 2));
        std::thread::sleep(Duration::from_millis(20));
        // The hub made again gets both, and forwards them as it gets them.
        let at_hub = bus.recv(&hub, &opts(10, 30_000)).unwrap();
        forward_as_hub(bus, &a, &b, &at_hub);
        let seqs: Vec<u64> = at_hub.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2], "the hub gets them in sequence order");
        let got = bus.recv(&b, &opts(10, 30_000)).unwrap();
        let ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, [first.id.as_str(), second.id.as_str()], "none lost");
    });
}

#[test]
fn r4_forwarded_messages_keep_their_sequence_and_duplicates_are_dropped() {
    each_layout("dedup", |bus, _| {
        let (a, hub, b) = (id("a"), id("hub"), id("b"));
        bus.init(&hub).unwrap();
        bus.init(&b).unwrap();
        // a -> b through the hub: written to the hub's inbox, numbered in b's sequence.
        let via = |p: &str| send_via_hub(bus, &a, &b, p, None);
        let r1 = via("1");
        let r2 = via("2");
        assert_eq!((r1.seq, r2.seq), (1, 2));
        assert_eq!(bus.depth(&b).unwrap().msgs, 0, "nothing reached b yet");
        let at_hub = bus.recv(&hub, &opts(10, 30_000)).unwrap();
        assert_eq!(at_hub.len(), 2);
        // The hub forwards each twice (as a hub restarted mid-batch would).
        let hops = vec!["a".to_owned(), "hub".to_owned()];
        for _ in 0..2 {
            forward_as_hub(bus, &a, &b, &at_hub);
        }
        let got = bus.recv(&b, &opts(10, 30_000)).unwrap();
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2], "duplicates dropped, sequence kept");
        assert_eq!(got[0].id, r1.id);
        assert_eq!(got[0].route.as_deref(), Some(&hops[..]));
        bus.ack_all(&b).unwrap();
        assert_eq!(
            bus.depth(&b).unwrap().msgs,
            0,
            "duplicates do not stay behind"
        );
        // A direct message of the same pair continues the sequence.
        assert_eq!(bus.send_str(&a, &b, "t", "3").unwrap().seq, 3);
        // Broadcast copies are recognised by id.
        let fan = |p: &str, fid: &str| {
            bus.send_with(
                &a,
                &b,
                "all",
                &Payload::parse(p, 100).unwrap(),
                &SendOptions {
                    id: Some(fid),
                    route: Some(&hops),
                    fanout: Some("*"),
                    ..SendOptions::default()
                },
            )
            .unwrap()
        };
        fan("4", "msg-1-100");
        fan("4", "msg-1-100");
        fan("5", "msg-1-101");
        let got = bus.recv(&b, &opts(10, 30_000)).unwrap();
        let ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert_eq!(ids.iter().filter(|i| **i == "msg-1-100").count(), 1);
    });
}

#[test]
fn r4_a_filtered_receive_of_a_routed_message_loses_none_sent_before_it() {
    // A request/reply through hubs: the reply is picked out by a filter while older routed
    // messages from the same sender wait. They must still be delivered, and the re-forwarded
    // copies of all of them still dropped.
    each_layout("dedup-filter", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        let hops = vec!["a".to_owned(), "hub".to_owned()];
        let forward = |seq: u64, mid: &str| {
            bus.send_with(
                &a,
                &b,
                "t",
                &Payload::parse(&seq.to_string(), 100).unwrap(),
                &SendOptions {
                    id: Some(mid),
                    seq: Some(seq),
                    route: Some(&hops),
                    ..SendOptions::default()
                },
            )
            .unwrap();
        };
        for seq in 1..=4 {
            forward(seq, &format!("msg-1-{seq}"));
        }
        let pick = |want: &'static str| {
            let f = move |e: &shoal::Envelope| e.id == want;
            let o = RecvOptions {
                filter: Some(Filter(&f)),
                ..opts(10, 30_000)
            };
            let got = bus.recv(&b, &o).unwrap();
            assert_eq!(got.len(), 1, "{want}");
            bus.ack(&b, &[got[0].id.clone()]).unwrap();
        };
        pick("msg-1-3");
        // A hub restarted now forwards 1..4 again (same ids and sequences).
        for seq in 1..=4 {
            forward(seq, &format!("msg-1-{seq}"));
        }
        pick("msg-1-2");
        let rest: Vec<u64> = bus
            .recv(&b, &opts(100, 30_000))
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(rest, [1, 4], "older messages kept, copies dropped");
        bus.ack_all(&b).unwrap();
        forward(3, "msg-1-3");
        forward(5, "msg-1-5");
        let rest: Vec<u64> = bus
            .recv(&b, &opts(100, 30_000))
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(rest, [5]);
        bus.ack_all(&b).unwrap();
        assert_eq!(bus.depth(&b).unwrap().msgs, 0);
    });
}

#[test]
fn r4_expire_leases_hands_everything_out_again_at_once() {
    each_layout("expire", |bus, _| {
        let (a, b) = (id("a"), id("b"));
        bus.init(&b).unwrap();
        for i in 0..3 {
            bus.send_str(&a, &b, "t", &i.to_string()).unwrap();
        }
        assert_eq!(bus.recv(&b, &opts(10, 3_600_000)).unwrap().len(), 3);
        assert!(bus.recv(&b, &opts(10, 3_600_000)).unwrap().is_empty());
        assert_eq!(bus.store().expire_leases(&b).unwrap(), 3);
        let again = bus.recv(&b, &opts(10, 3_600_000)).unwrap();
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|m| m.delivery == Some(2)));
    });
}
