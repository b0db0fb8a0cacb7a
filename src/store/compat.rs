//! The compat store: one file per message, laid out and formatted as the bash `message-bus.sh`
//! wrote them, so scripts that read `$MESSAGE_BASE_DIR/<id>/inbox/*.json` directly, grep their
//! keys, or `mv` them to `processed/`, keep working.
//!
//! A message is written to a hidden temporary name and renamed into `inbox/<msg-id>.json`
//! (never replacing an existing file) under `inbox/.lock`, the same `flock` the bash bus took.
//! Receiving leases files by name; acknowledging deletes them. A file a script moves away or
//! deletes counts as consumed. Shoal's own files live in `<id>/.shoal/`.
//!
//! # Message file format
//!
//! ```text
//! {
//!   "version": "1.0",
//!   "msg_id": "msg-1795310779-1409286144017",
//!   "from": "alice",
//!   "to": "bob",
//!   "timestamp": 1795310779,
//!   "sequence": 4,
//!   "type": "hello",
//!   "payload": {"n":1},
//!   "requires_ack": false
//! }
//! ```
//!
//! followed by a newline. Keys, order and spacing are the bash bus's; `reply_to` and `route`
//! (and `fanout`, `gather`) are added after `requires_ack` only on messages that carry them. Messages are ordered by
//! `timestamp` (seconds, taken under the inbox lock), then `sequence`, then file name: the bash
//! bus's order.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::meta::{Meta, ShardField, SlotError};
use super::slots::{self, SlotPaths, SlotState, Slots};
use super::{
    AckReport, AckTarget, AgentError, AgentSettings, Batch, Depth, IdMap, Receipt, RecvError,
    RecvRequest, Removed, SendError, Store, create_private_file, mkdir_private,
};
use crate::envelope::{AgentId, Draft, ENVELOPE_VERSION, Envelope, now_micros};
use crate::layout::Layout;
use crate::wake::{Doorbell, WakeTarget};

/// The `version` the bash bus writes in every message.
pub const BASH_MESSAGE_VERSION: &str = "1.0";

/// One message in the bash bus's file format, without the trailing newline.
pub fn bash_message(e: &Envelope) -> String {
    let s = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let mut out = format!(
        "{{\n  \"version\": \"{BASH_MESSAGE_VERSION}\",\n  \"msg_id\": {},\n  \"from\": {},\n  \"to\": {},\n  \
         \"timestamp\": {},\n  \"sequence\": {},\n  \"type\": {},\n  \"payload\": {},\n  \"requires_ack\": false",
        s(&e.id),
        s(&e.from),
        s(&e.to),
        e.epoch_seconds(),
        e.seq,
        s(&e.kind),
        e.payload.get()
    );
    if let Some(r) = &e.reply_to {
        out.push_str(&format!(",\n  \"reply_to\": {}", s(r)));
    }
    if let Some(route) = &e.route {
        out.push_str(&format!(
            ",\n  \"route\": {}",
            serde_json::to_string(route).unwrap_or_default()
        ));
    }
    if let Some(f) = &e.fanout {
        out.push_str(&format!(",\n  \"fanout\": {}", s(f)));
    }
    if let Some(g) = e.gather {
        out.push_str(&format!(
            ",\n  \"gather\": {{\"deadline\": {}}}",
            g.deadline
        ));
    }
    out.push_str("\n}");
    out
}

/// A message file, as read.
#[derive(Deserialize)]
struct BashMessage {
    msg_id: String,
    from: String,
    to: String,
    timestamp: u64,
    sequence: u64,
    #[serde(rename = "type")]
    kind: String,
    payload: Box<RawValue>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    route: Option<Vec<String>>,
    #[serde(default)]
    fanout: Option<String>,
    #[serde(default)]
    gather: Option<crate::envelope::Gather>,
}

/// Parse a message file into an envelope (`ts` has whole-second precision).
pub fn parse_bash_message(bytes: &[u8]) -> serde_json::Result<Envelope> {
    let m: BashMessage = serde_json::from_slice(bytes)?;
    Ok(Envelope {
        v: ENVELOPE_VERSION,
        id: m.msg_id,
        from: m.from,
        to: m.to,
        kind: m.kind,
        seq: m.sequence,
        ts: m.timestamp.saturating_mul(1_000_000),
        reply_to: m.reply_to,
        route: m.route,
        fanout: m.fanout,
        gather: m.gather,
        payload: m.payload,
        delivery: None,
    })
}

/// Receiver state of a compat inbox (format version 1, in `.shoal/state.0`/`state.1`):
/// `{"v":1,"leases":[{"name":"msg-...json","id":"msg-...","len":312,"n":1,"until":1795310809123}],"snapshot":["msg-...json"]}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CompatState {
    v: u32,
    #[serde(default)]
    leases: Vec<FileLease>,
    /// File names the last `receive` returned, for `clear`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<Vec<String>>,
    /// What was delivered of routed messages, to drop their duplicates.
    #[serde(default, flatten)]
    dedup: super::Dedup,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileLease {
    name: String,
    id: String,
    len: u64,
    n: u32,
    until: u64,
}

const COMPAT_STATE_VERSION: u32 = 1;

impl SlotState for CompatState {
    fn fresh(_meta: &Meta) -> Self {
        CompatState {
            v: COMPAT_STATE_VERSION,
            ..CompatState::default()
        }
    }

    fn checked(self, _meta: &Meta, path: &Path) -> Result<Self, RecvError> {
        if self.v > COMPAT_STATE_VERSION {
            return Err(RecvError::CorruptState {
                path: path.to_owned(),
                detail: format!(
                    "state version {} is newer than {COMPAT_STATE_VERSION}",
                    self.v
                ),
            });
        }
        Ok(self)
    }
}

/// One agent's open inbox.
#[derive(Debug)]
struct Inbox {
    inbox: PathBuf,
    meta: Meta,
    bell: Doorbell,
    lock: File,
    /// flock does not exclude this process's threads from each other.
    lock_mutex: Mutex<()>,
    seq_slots: Mutex<IdMap<usize>>,
    recv: Slots<CompatState>,
}

/// A message file in an inbox.
struct FileMsg {
    name: String,
    len: u64,
    env: Envelope,
}

/// The compat store under one root.
#[derive(Debug)]
pub struct CompatStore {
    layout: Layout,
    inboxes: Mutex<IdMap<Arc<Inbox>>>,
}

fn slot_paths(layout: &Layout, dir: &Path) -> SlotPaths {
    SlotPaths {
        lock: layout.recv_lock_in(dir),
        slots: [layout.state_in(dir, 0), layout.state_in(dir, 1)],
    }
}

fn is_message_name(name: &str) -> bool {
    name.ends_with(".json") && !name.starts_with('.')
}

impl CompatStore {
    /// The store of the compat root laid out by `layout`.
    pub fn new(layout: Layout) -> CompatStore {
        CompatStore {
            layout,
            inboxes: Mutex::new(IdMap::default()),
        }
    }

    /// The open inbox of `id`; an agent directory the bash bus made (an `inbox/` but no
    /// `.shoal/`) is adopted on first use.
    fn inbox(&self, id: &AgentId) -> io::Result<Option<Arc<Inbox>>> {
        let mut map = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ib) = map.get(id) {
            if !ib.meta.removed() {
                return Ok(Some(Arc::clone(ib)));
            }
            map.remove(id);
        }
        let dir = self.layout.agent_dir(id);
        let meta = match Meta::open(&self.layout.meta_in(&dir))? {
            Some(m) => m,
            None => {
                let inbox = self.layout.inbox_in(&dir);
                if !fs::symlink_metadata(&inbox).is_ok_and(|m| m.is_dir()) {
                    return Ok(None);
                }
                self.adopt(&dir)?;
                match Meta::open(&self.layout.meta_in(&dir))? {
                    Some(m) => m,
                    None => return Ok(None),
                }
            }
        };
        let inbox = self.layout.inbox_in(&dir);
        let lock_path = self.layout.inbox_lock_in(&dir);
        let lock = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None), // removed meanwhile
            Err(e) => return Err(e),
        };
        let ib = Arc::new(Inbox {
            recv: Slots::new(slot_paths(&self.layout, &dir)),
            bell: meta.doorbell(),
            meta,
            lock,
            lock_mutex: Mutex::new(()),
            seq_slots: Mutex::new(IdMap::default()),
            inbox,
        });
        map.insert(id.clone(), Arc::clone(&ib));
        Ok(Some(ib))
    }

    /// Give an agent directory made by the bash bus shoal's files, and make it private.
    fn adopt(&self, dir: &Path) -> io::Result<()> {
        let internals = self.layout.internals_in(dir);
        let staging = dir.join(format!(".shoal-staging-{:016x}", crate::sys::random_u64()));
        let result = (|| {
            mkdir_private(&staging)?;
            let existing = count_files(&self.layout.inbox_in(dir))?;
            let settings = AgentSettings {
                shards: 1,
                quota_msgs: crate::root::DEFAULT_QUOTA_MSGS,
                quota_bytes: crate::root::DEFAULT_QUOTA_BYTES,
            };
            Meta::create(&staging.join("meta"), &settings)?;
            let meta = Meta::open(&staging.join("meta"))?.ok_or(io::ErrorKind::NotFound)?;
            meta.shard(0, ShardField::Msgs)
                .store(existing.msgs, Ordering::Release);
            meta.shard(0, ShardField::Len)
                .store(existing.bytes, Ordering::Release);
            self.adopt_sequences(dir, &meta)?;
            let paths = SlotPaths {
                lock: staging.join("recv.lock"),
                slots: [staging.join("state.0"), staging.join("state.1")],
            };
            slots::create(&paths).map_err(|e| io::Error::other(e.to_string()))?;
            match fs::rename(&staging, &internals) {
                Ok(()) => {}
                // Another process adopted it first.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) =>
                {
                    let _ = fs::remove_dir_all(&staging);
                }
                Err(e) => return Err(e),
            }
            // The bash bus made everything world-readable (755/644): make it private.
            for d in [
                dir.to_owned(),
                self.layout.inbox_in(dir),
                self.layout.outbox_in(dir),
            ] {
                if d.is_dir() {
                    fs::set_permissions(&d, fs::Permissions::from_mode(0o700))?;
                }
            }
            for e in fs::read_dir(self.layout.inbox_in(dir))?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    match fs::set_permissions(e.path(), fs::Permissions::from_mode(0o600)) {
                        Ok(()) => {}
                        // Consumed meanwhile, or a sender's temporary file (made 0600) renamed
                        // into place: others use the inbox as soon as one adoption has won.
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        Err(err) => return Err(err),
                    }
                }
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    fn open_for_send(&self, id: &AgentId) -> Result<Arc<Inbox>, SendError> {
        self.inbox(id)
            .map_err(|e| SendError::at(self.layout.agent_dir(id))(e))?
            .ok_or_else(|| SendError::UnknownRecipient(id.clone()))
    }

    /// The sequence slot of `from` in `ib` (the inbox of `to`).
    fn seq_slot(&self, ib: &Inbox, from: &AgentId, to: &AgentId) -> Result<usize, SendError> {
        let mut slots = ib.seq_slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = slots.get(from) {
            return Ok(i);
        }
        let i = ib.meta.slot_for(from).map_err(|e| match e {
            SlotError::Full => SendError::TooManySenders {
                to: to.clone(),
                from: from.clone(),
                capacity: super::meta::SLOT_CAPACITY,
            },
            SlotError::Io(e) => SendError::at(self.layout.meta(to))(e),
        })?;
        slots.insert(from.clone(), i);
        Ok(i)
    }

    /// Count one message sent by `from`, if it is an agent. Only its meta table is needed: a
    /// sender that is not (yet) an open inbox here is not opened in full.
    fn count_sent(&self, from: &AgentId) {
        let cached = self
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(from)
            .cloned();
        match cached {
            Some(ib) => {
                ib.meta.sent().fetch_add(1, Ordering::Relaxed);
                ib.meta.touch(crate::store::now_ms());
            }
            None => {
                if let Ok(Some(m)) = Meta::open(&self.layout.meta(from)) {
                    m.sent().fetch_add(1, Ordering::Relaxed);
                    m.touch(crate::store::now_ms());
                }
            }
        }
    }

    /// Carry on each pair's sequence where the bash bus left it: it kept the last sequence
    /// from `<from>` to `<to>` in `<from>/.sequences/<to>`.
    fn adopt_sequences(&self, dir: &Path, meta: &Meta) -> io::Result<()> {
        let Some(to) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Ok(());
        };
        for e in fs::read_dir(self.layout.agents_dir())?.flatten() {
            let Ok(from) = AgentId::new(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let counter = e.path().join(".sequences").join(&to);
            let Ok(text) = fs::read_to_string(&counter) else {
                continue;
            };
            let Ok(last) = text.trim().parse::<u64>() else {
                continue;
            };
            match meta.slot_for(&from) {
                Ok(i) => meta.seq(i).store(last, Ordering::Release),
                Err(SlotError::Io(err)) => return Err(err),
                Err(SlotError::Full) => {}
            }
        }
        Ok(())
    }

    fn existing(&self, id: &AgentId) -> Result<Arc<Inbox>, RecvError> {
        self.inbox(id)
            .map_err(|e| RecvError::at(self.layout.agent_dir(id))(e))?
            .ok_or_else(|| RecvError::UnknownAgent(id.clone()))
    }

    fn assemble(&self, dir: &Path, settings: &AgentSettings) -> Result<(), AgentError> {
        for d in [
            dir.to_owned(),
            self.layout.inbox_in(dir),
            self.layout.outbox_in(dir),
            self.layout.internals_in(dir),
        ] {
            mkdir_private(&d).map_err(AgentError::at(&d))?;
        }
        let lock = self.layout.inbox_lock_in(dir);
        create_private_file(&lock).map_err(AgentError::at(&lock))?;
        slots::create(&slot_paths(&self.layout, dir))?;
        let m = self.layout.meta_in(dir);
        let one_shard = AgentSettings {
            shards: 1,
            ..*settings
        };
        Meta::create(&m, &one_shard).map_err(AgentError::at(&m))
    }
}

/// Messages and bytes in an inbox directory, counted exactly.
struct Count {
    msgs: u64,
    bytes: u64,
}

fn count_files(inbox: &Path) -> io::Result<Count> {
    let mut c = Count { msgs: 0, bytes: 0 };
    for e in fs::read_dir(inbox)? {
        let e = e?;
        if is_message_name(&e.file_name().to_string_lossy()) {
            c.msgs += 1;
            c.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    Ok(c)
}

impl Inbox {
    /// Every message file, parsed, in the bash bus's order; `skip` filters names out before
    /// they are read. Returns the files and how many could not be parsed.
    fn messages(&self, skip: impl Fn(&str) -> bool) -> io::Result<(Vec<FileMsg>, u64)> {
        let mut out = Vec::new();
        let mut corrupt = 0;
        for e in fs::read_dir(&self.inbox)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_message_name(&name) || skip(&name) {
                continue;
            }
            let bytes = match fs::read(e.path()) {
                Ok(b) => b,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue, // consumed meanwhile
                Err(err) => return Err(err),
            };
            match parse_bash_message(&bytes) {
                Ok(env) => out.push(FileMsg {
                    name,
                    len: bytes.len() as u64,
                    env,
                }),
                Err(_) => corrupt += 1,
            }
        }
        out.sort_by(|a, b| (a.env.ts, a.env.seq, &a.name).cmp(&(b.env.ts, b.env.seq, &b.name)));
        Ok((out, corrupt))
    }

    /// Delete message files (acknowledgement); returns how many existed.
    fn remove_files(&self, names: impl IntoIterator<Item = (String, u64)>) -> io::Result<u64> {
        let (mut n, mut bytes) = (0, 0);
        for (name, len) in names {
            match fs::remove_file(self.inbox.join(&name)) {
                Ok(()) => {
                    n += 1;
                    bytes += len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.meta
            .shard(0, ShardField::AckedMsgs)
            .fetch_add(n, Ordering::AcqRel);
        self.meta
            .shard(0, ShardField::AckedBytes)
            .fetch_add(bytes, Ordering::AcqRel);
        Ok(n)
    }
}

impl Store for CompatStore {
    fn create_agent(&self, id: &AgentId, settings: &AgentSettings) -> Result<bool, AgentError> {
        let update = |ib: Arc<Inbox>| {
            ib.meta.set_quota(settings.quota_msgs, settings.quota_bytes);
            false
        };
        if let Some(ib) = self
            .inbox(id)
            .map_err(|e| AgentError::at(self.layout.agent_dir(id))(e))?
        {
            return Ok(update(ib));
        }
        let staging = self.layout.staging_dir(id, crate::sys::random_u64());
        if let Err(e) = self.assemble(&staging, settings) {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        let dest = self.layout.agent_dir(id);
        match fs::rename(&staging, &dest) {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) {
                    match self.inbox(id).map_err(AgentError::at(&dest))? {
                        Some(ib) => Ok(update(ib)),
                        None => Err(AgentError::at(&dest)(e)),
                    }
                } else {
                    Err(AgentError::at(&dest)(e))
                }
            }
        }
    }

    fn agent_exists(&self, id: &AgentId) -> bool {
        matches!(self.inbox(id), Ok(Some(_)))
    }

    fn remove_agent(&self, id: &AgentId) -> Result<Option<Removed>, AgentError> {
        let dir = self.layout.agent_dir(id);
        let Some(ib) = self.inbox(id).map_err(AgentError::at(&dir))? else {
            return Ok(None);
        };
        let removed = Removed {
            inbox: count_files(&ib.inbox).map(|c| c.msgs).unwrap_or(0),
            sent: ib.meta.sent().load(Ordering::Relaxed),
        };
        {
            let _m = ib.lock_mutex.lock().unwrap_or_else(|e| e.into_inner());
            ib.lock
                .lock()
                .map_err(|e| AgentError::at(self.layout.inbox_lock_in(&dir))(e))?;
            ib.meta.mark_removed();
            ib.bell.ring();
            let _ = ib.lock.unlock();
        }
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let trash = self.layout.trash_dir(id, crate::sys::random_u64());
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::at(&dir)(e)),
        }
        fs::remove_dir_all(&trash).map_err(AgentError::at(&trash))?;
        Ok(Some(removed))
    }

    fn agents(&self) -> Result<Vec<AgentId>, AgentError> {
        let root = self.layout.agents_dir();
        let entries = match fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AgentError::at(&root)(e)),
        };
        let mut out: Vec<AgentId> = entries
            .filter_map(Result::ok)
            .filter_map(|e| AgentId::new(&e.file_name().to_string_lossy()).ok())
            .filter(|id| self.layout.inbox_dir(id).is_dir())
            .collect();
        out.sort();
        Ok(out)
    }

    fn append(&self, d: Draft<'_>) -> Result<Receipt, SendError> {
        let target = d.target();
        let ib = self.open_for_send(target)?;
        // A routed message is numbered in the recipient's table (see the JSONL store).
        let numbering = match (d.seq, d.via) {
            (Some(given), _) => Numbering::Given(given),
            (None, None) => Numbering::Next(Arc::clone(&ib), self.seq_slot(&ib, d.from, target)?),
            (None, Some(_)) => {
                let fin = self.open_for_send(d.to)?;
                let slot = self.seq_slot(&fin, d.from, d.to)?;
                Numbering::Next(fin, slot)
            }
        };
        let dir = self.layout.agent_dir(target);
        let seq = {
            let _m = ib.lock_mutex.lock().unwrap_or_else(|e| e.into_inner());
            ib.lock
                .lock()
                .map_err(|e| SendError::at(self.layout.inbox_lock_in(&dir))(e))?;
            let r = write_message(self, &ib, &d, &numbering);
            let _ = ib.lock.unlock();
            r?
        };
        ib.meta.note_arrival(crate::store::now_ms());
        ib.bell.ring();
        if d.seq.is_none() {
            self.count_sent(d.from); // a forwarded message was counted when it was sent
        }
        Ok(Receipt { id: d.id, seq })
    }

    fn receive(&self, id: &AgentId, req: &RecvRequest<'_>) -> Result<Batch, RecvError> {
        let ib = self.existing(id)?;
        // Every receive counts as a heartbeat; lease deadlines, in both layouts, come from the
        // coarse clock (the wait loop sleeps until them by the same clock).
        let now = crate::sys::now_ms_coarse();
        ib.meta.touch(now);
        let mut g = ib.recv.lock(&ib.meta)?;
        let mut st = g.load()?;
        // Leases on files a script moved away or deleted are over: the message was consumed.
        let present: std::collections::HashSet<String> =
            list_names(&ib.inbox).map_err(RecvError::at(&ib.inbox))?;
        let before = st.leases.len();
        st.leases.retain(|l| present.contains(&l.name));
        let mut changed = st.leases.len() != before;
        let held: std::collections::HashMap<String, usize> = st
            .leases
            .iter()
            .enumerate()
            .filter(|(_, l)| l.until > now)
            .map(|(i, l)| (l.name.clone(), i))
            .collect();
        let (files, corrupt) = ib
            .messages(|n| held.contains_key(n))
            .map_err(RecvError::at(&ib.inbox))?;
        let until = now + req.lease.as_millis() as u64;
        let mut batch = Batch {
            corrupt,
            ..Batch::default()
        };
        let mut duplicates = Vec::new();
        // Lowest sequence of a routed message the filter left, per sender (see `Dedup`).
        let mut left = super::LeftBehind::default();
        for f in files {
            if batch.messages.len() >= req.max {
                break;
            }
            let mut env = f.env;
            if req.filter.is_some_and(|flt| !(flt.0)(&env)) {
                left.note(&env);
                continue; // left in place for another receive
            }
            match st.leases.iter_mut().find(|l| l.name == f.name) {
                Some(l) => {
                    l.n += 1;
                    l.until = until;
                    env.delivery = Some(l.n);
                }
                None if st.dedup.seen(&env, left.older_than(&env)) => {
                    duplicates.push((f.name, f.len));
                    changed = true;
                    continue;
                }
                None => {
                    st.leases.push(FileLease {
                        name: f.name,
                        id: env.id.clone(),
                        len: f.len,
                        n: 1,
                        until,
                    });
                    env.delivery = Some(1);
                }
            }
            batch.messages.push(env);
            changed = true;
        }
        batch.duplicates = duplicates.len() as u64;
        ib.remove_files(duplicates)
            .map_err(RecvError::at(&ib.inbox))?;
        batch.next_expiry_ms = st.leases.iter().map(|l| l.until).min();
        if changed {
            g.save(st)?;
        } else {
            g.keep(st);
        }
        Ok(batch)
    }

    fn consume(
        &self,
        id: &AgentId,
        req: &RecvRequest<'_>,
        handle: &mut dyn FnMut(&[Envelope]) -> bool,
    ) -> Result<Batch, RecvError> {
        // One file per message: leasing then deleting is as cheap as anything here.
        let batch = self.receive(id, req)?;
        if !batch.messages.is_empty() && handle(&batch.messages) {
            let ids: Vec<String> = batch.messages.iter().map(|m| m.id.clone()).collect();
            self.ack(id, AckTarget::Ids(&ids))?;
        }
        Ok(batch)
    }

    fn own_receiver(&self, id: &AgentId) -> Result<(), RecvError> {
        self.existing(id)?.recv.own()
    }

    fn expire_leases(&self, id: &AgentId) -> Result<usize, RecvError> {
        let ib = self.existing(id)?;
        let mut g = ib.recv.lock(&ib.meta)?;
        let mut st = g.load()?;
        let n = st.leases.len();
        for l in &mut st.leases {
            l.until = 0;
        }
        if n > 0 {
            g.save(st)?;
        } else {
            g.keep(st);
        }
        Ok(n)
    }

    fn ack(&self, id: &AgentId, target: AckTarget<'_>) -> Result<AckReport, RecvError> {
        let ib = self.existing(id)?;
        let mut g = ib.recv.lock(&ib.meta)?;
        let mut st = g.load()?;
        let mut report = AckReport::default();
        let take: Vec<FileLease> = match target {
            AckTarget::AllDelivered => std::mem::take(&mut st.leases),
            AckTarget::Ids(ids) => {
                let mut taken = Vec::new();
                for wanted in ids {
                    match st.leases.iter().position(|l| &l.id == wanted) {
                        Some(i) => taken.push(st.leases.remove(i)),
                        None if !report.unknown.contains(wanted) => {
                            report.unknown.push(wanted.clone())
                        }
                        None => {}
                    }
                }
                taken
            }
        };
        report.acked = take.len();
        ib.remove_files(take.into_iter().map(|l| (l.name, l.len)))
            .map_err(RecvError::at(&ib.inbox))?;
        if report.acked > 0 {
            g.save(st)?;
        } else {
            g.keep(st);
        }
        Ok(report)
    }

    fn peek_all(&self, id: &AgentId) -> Result<Vec<Envelope>, RecvError> {
        let ib = self.existing(id)?;
        let mut g = ib.recv.lock(&ib.meta)?;
        let mut st = g.load()?;
        let (files, _) = ib.messages(|_| false).map_err(RecvError::at(&ib.inbox))?;
        st.snapshot = Some(files.iter().map(|f| f.name.clone()).collect());
        g.save(st)?;
        Ok(files.into_iter().map(|f| f.env).collect())
    }

    fn clear(&self, id: &AgentId) -> Result<u64, RecvError> {
        let ib = self.existing(id)?;
        let mut g = ib.recv.lock(&ib.meta)?;
        let mut st = g.load()?;
        let names: Vec<String> = match st.snapshot.take() {
            Some(n) => n,
            None => list_names(&ib.inbox)
                .map_err(RecvError::at(&ib.inbox))?
                .into_iter()
                .collect(),
        };
        let sized: Vec<(String, u64)> = names
            .into_iter()
            .map(|n| {
                let len = fs::metadata(ib.inbox.join(&n))
                    .map(|m| m.len())
                    .unwrap_or(0);
                (n, len)
            })
            .collect();
        let gone: std::collections::HashSet<&str> = sized.iter().map(|(n, _)| n.as_str()).collect();
        st.leases.retain(|l| !gone.contains(l.name.as_str()));
        let n = ib
            .remove_files(sized.clone())
            .map_err(RecvError::at(&ib.inbox))?;
        g.save(st)?;
        Ok(n)
    }

    fn depth(&self, id: &AgentId) -> Result<Depth, RecvError> {
        let ib = self.existing(id)?;
        let c = count_files(&ib.inbox).map_err(RecvError::at(&ib.inbox))?;
        Ok(Depth {
            msgs: c.msgs,
            bytes: c.bytes,
        })
    }

    fn sent_count(&self, id: &AgentId) -> Result<u64, RecvError> {
        Ok(self.existing(id)?.meta.sent().load(Ordering::Relaxed))
    }

    fn heartbeat(&self, id: &AgentId) -> Result<(), RecvError> {
        self.existing(id)?.meta.touch(crate::store::now_ms());
        Ok(())
    }

    fn activity(&self, id: &AgentId) -> Result<crate::store::Activity, RecvError> {
        Ok(crate::store::Activity::from_meta(&self.existing(id)?.meta))
    }

    fn wake_target(&self, id: &AgentId) -> Result<WakeTarget, RecvError> {
        let ib = self.existing(id)?;
        Ok(WakeTarget {
            watch_dir: ib.inbox.clone(),
            doorbell: ib.bell.clone(),
            outside_writers: true,
        })
    }
}

fn list_names(inbox: &Path) -> io::Result<std::collections::HashSet<String>> {
    let mut out = std::collections::HashSet::new();
    for e in fs::read_dir(inbox)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if is_message_name(&name) {
            out.insert(name);
        }
    }
    Ok(out)
}

/// Under the inbox lock: check the quota, take the next sequence number, write the message
/// file under a temporary name and rename it into place without replacing anything.
/// Where a message's sequence number comes from.
enum Numbering {
    Given(u64),
    Next(Arc<Inbox>, usize),
}

fn write_message(
    store: &CompatStore,
    ib: &Inbox,
    d: &Draft<'_>,
    numbering: &Numbering,
) -> Result<u64, SendError> {
    let target = d.target();
    if ib.meta.removed() {
        return Err(SendError::UnknownRecipient(target.clone()));
    }
    let dir = store.layout.agent_dir(target);
    // The timestamp is taken under the lock, so one pair's (timestamp, sequence) order is its
    // sending order, as the bash bus's sort expects. A forwarded message keeps its own.
    let ts = if d.seq.is_some() { d.ts } else { now_micros() };
    let seq_cell = match numbering {
        Numbering::Given(_) => None,
        Numbering::Next(fin, slot) => Some(fin.meta.seq(*slot)),
    };
    let seq = match (numbering, seq_cell) {
        (Numbering::Given(n), _) => *n,
        (_, Some(c)) => c.load(Ordering::Acquire) + 1,
        (_, None) => unreachable!("a numbered source has a cell"),
    };
    let env = Envelope {
        v: ENVELOPE_VERSION,
        id: d.id.clone(),
        from: d.from.to_string(),
        to: d.to.to_string(),
        kind: d.kind.to_owned(),
        seq,
        ts,
        reply_to: d.reply_to.map(str::to_owned),
        route: d.route.map(<[String]>::to_vec),
        fanout: d.fanout.map(str::to_owned),
        gather: d.gather,
        payload: RawValue::from_string(d.payload.as_str().to_owned()).map_err(|e| {
            SendError::Io {
                path: dir.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }
        })?,
        delivery: None,
    };
    let mut text = bash_message(&env);
    text.push('\n');
    check_quota(ib, d, text.len() as u64)?;
    let tmp = store.layout.message_tmp_in(&dir, &d.id);
    let dest = store.layout.message_in(&dir, &d.id);
    if d.route.is_some() && dest.exists() {
        // A routed copy of a message already here: a hub forwarding again after a restart.
        return Ok(seq);
    }
    let written = (|| {
        let mut f = create_private_file(&tmp)?;
        f.write_all(text.as_bytes())?;
        drop(f);
        crate::sys::rename_noreplace(&tmp, &dest)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(SendError::at(&dest)(e));
    }
    if let Some(c) = seq_cell {
        c.store(seq, Ordering::Release);
    }
    ib.meta
        .shard(0, ShardField::Msgs)
        .fetch_add(1, Ordering::AcqRel);
    ib.meta
        .shard(0, ShardField::Len)
        .fetch_add(text.len() as u64, Ordering::AcqRel);
    Ok(seq)
}

/// Refuse a message over the quota. The counters in the meta table overestimate when scripts
/// consume files themselves (mv, rm); before refusing, the inbox is counted exactly and the
/// counters corrected.
fn check_quota(ib: &Inbox, d: &Draft<'_>, len: u64) -> Result<(), SendError> {
    let (quota_msgs, quota_bytes) = ib.meta.quota();
    let over = |msgs: u64, bytes: u64| msgs + 1 > quota_msgs || bytes + len > quota_bytes;
    let (msgs, bytes) = ib.meta.pending();
    if !over(msgs, bytes) {
        return Ok(());
    }
    let exact = count_files(&ib.inbox).map_err(SendError::at(&ib.inbox))?;
    let f = |field| ib.meta.shard(0, field);
    f(ShardField::Msgs).store(exact.msgs, Ordering::Release);
    f(ShardField::Len).store(exact.bytes, Ordering::Release);
    f(ShardField::AckedMsgs).store(0, Ordering::Release);
    f(ShardField::AckedBytes).store(0, Ordering::Release);
    if over(exact.msgs, exact.bytes) {
        return Err(SendError::QuotaExceeded {
            to: d.target().clone(),
            pending_msgs: exact.msgs,
            pending_bytes: exact.bytes,
            quota_msgs,
            quota_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message file keeps every optional field a hub relies on: a broadcast copy written
    /// into a compat inbox is still a broadcast, numbered, with its round's deadline.
    #[test]
    fn message_files_keep_routing_fields() {
        let line = r#"{"v":1,"id":"msg-1-2","from":"coord","to":"hub-a","type":"ping","seq":3,"ts":4000000,"reply_to":"msg-0-1","route":["coord","hub-a"],"fanout":"a","gather":{"deadline":5},"payload":{"x":[1,2]}}"#;
        let e = Envelope::parse(line.as_bytes()).unwrap();
        let back = parse_bash_message(bash_message(&e).as_bytes()).unwrap();
        assert_eq!(back.to_line(), e.to_line());
        // And none of them appear on a plain message, as in the bash bus's files.
        let plain = r#"{"v":1,"id":"msg-1-3","from":"a","to":"b","type":"t","seq":1,"ts":1000000,"payload":0}"#;
        let text = bash_message(&Envelope::parse(plain.as_bytes()).unwrap());
        for key in ["reply_to", "route", "fanout", "gather"] {
            assert!(!text.contains(key), "{key} in {text}");
        }
    }
}
