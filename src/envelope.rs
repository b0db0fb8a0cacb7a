//! Wire types: agent ids, message ids and the message envelope (format version 1).
//!
//! # The envelope
//!
//! Every message is stored as one line of JSON, an [`Envelope`]. Fields, in the order written:
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `v` | integer | envelope format version, currently `1` |
//! | `id` | string | message id, `msg-<epoch-seconds>-<decimal suffix>`, unique across processes |
//! | `from` | string | sending agent id |
//! | `to` | string | receiving agent id |
//! | `type` | string | message type chosen by the sender, 1-256 bytes |
//! | `seq` | integer | per-(`from`, `to`) sequence, 1, 2, 3, ... in the order sent |
//! | `ts` | integer | send time, microseconds since the Unix epoch |
//! | `reply_to` | string, optional | id of the message this one answers (request/reply) |
//! | `route` | array of strings, optional | agents the message travelled through, sender first |
//! | `fanout` | string, optional | on a broadcast: the team it goes to (`*` for every team) |
//! | `gather` | object, optional | on a round's request: `{"deadline": <ms since the epoch>}` |
//! | `payload` | any JSON | the sender's payload, byte for byte (minified only if it spanned lines) |
//! | `delivery` | integer, output only | how many times this message has been delivered; never stored |
//!
//! Readers ignore keys they do not know, so later versions may add optional keys without
//! changing `v`; a change that breaks old readers bumps `v`.
//!
//! Example line:
//!
//! ```text
//! {"v":1,"id":"msg-1795310779-1409286144017","from":"alice","to":"bob","type":"hello","seq":4,"ts":1795310779123456,"payload":{"n":1}}
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

mod canonical;
pub(crate) use canonical::batch_replies;

/// Envelope format version written by this build.
pub const ENVELOPE_VERSION: u32 = 1;

/// Longest accepted message type, in bytes.
pub const MAX_TYPE_LEN: usize = 256;

/// Longest agent id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// A validated agent id: `^[A-Za-z0-9_-]{1,64}$`, not starting with `-`.
///
/// Agent ids become path components under the root, so nothing else may reach a path: no `/`,
/// no `.`, no `..`, no empty string, nothing an argument parser could take for an option.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AgentId(String);

/// Why a string is not a valid agent id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid agent id {id:?}: {reason} (ids match ^[A-Za-z0-9_-]{{1,64}}$ and do not start with '-')"
)]
pub struct InvalidId {
    /// The rejected input.
    pub id: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl AgentId {
    /// Validate `s` as an agent id.
    ///
    /// # Errors
    /// [`InvalidId`] when `s` is empty, longer than 64 bytes, starts with `-`, or contains a byte
    /// outside `[A-Za-z0-9_-]`.
    ///
    /// # Examples
    /// ```
    /// use shoal::AgentId;
    /// assert!(AgentId::new("worker-07").is_ok());
    /// assert!(AgentId::new("../evil").is_err());
    /// assert!(AgentId::new("-rf").is_err());
    /// ```
    pub fn new(s: &str) -> Result<AgentId, InvalidId> {
        let bad = |reason| {
            Err(InvalidId {
                id: s.to_owned(),
                reason,
            })
        };
        if s.is_empty() {
            return bad("empty");
        }
        if s.len() > MAX_ID_LEN {
            return bad("longer than 64 bytes");
        }
        if s.starts_with('-') {
            return bad("starts with '-'");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad("contains a character other than letters, digits, '_' and '-'");
        }
        Ok(AgentId(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for AgentId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for AgentId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AgentId::new(s)
    }
}

impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AgentId::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Generates message ids `msg-<epoch-seconds>-<suffix>`.
///
/// The suffix is one decimal `u64`: the process id in the top 22 bits (Linux `pid_max` is at most
/// 2^22) and a per-process counter in the low 42 bits that starts at a random value. Two live
/// processes never share a pid, so their ids cannot collide; a recycled pid in the same second
/// would also need its random counter window to overlap. The `msg-<seconds>-` prefix is the one
/// scripts of the bash bus already parse.
#[derive(Debug)]
pub struct IdGen {
    pid_bits: u64,
    counter: AtomicU64,
}

const COUNTER_BITS: u32 = 42;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

impl IdGen {
    /// A generator for this process.
    pub fn new() -> IdGen {
        IdGen {
            pid_bits: (u64::from(std::process::id()) & ((1 << 22) - 1)) << COUNTER_BITS,
            counter: AtomicU64::new(crate::sys::random_u64() & COUNTER_MASK),
        }
    }

    /// The process-wide generator.
    pub fn global() -> &'static IdGen {
        static GEN: std::sync::OnceLock<IdGen> = std::sync::OnceLock::new();
        GEN.get_or_init(IdGen::new)
    }

    /// The next id, for a message sent at `epoch_seconds`.
    pub fn next(&self, epoch_seconds: u64) -> String {
        let c = self.counter.fetch_add(1, Ordering::Relaxed) & COUNTER_MASK;
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(b"msg-");
        b.extend_from_slice(itoa(epoch_seconds).as_bytes());
        b.push(b'-');
        b.extend_from_slice(itoa(self.pid_bits | c).as_bytes());
        String::from_utf8(b).unwrap_or_default() // ASCII by construction
    }
}

impl Default for IdGen {
    fn default() -> Self {
        IdGen::new()
    }
}

/// Decimal formatting without going through `fmt` (used on the send path), two digits per
/// division. Not inlined: one copy of its code serves every number of a message (ids,
/// sequences, times, the receiver state), instead of an unrolled copy in each caller.
#[inline(never)]
pub(crate) fn itoa(mut n: u64) -> ItoaBuf {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    while n >= 100 {
        let d = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&PAIRS[d..d + 2]);
    }
    if n >= 10 {
        let d = n as usize * 2;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&PAIRS[d..d + 2]);
    } else {
        i -= 1;
        buf[i] = b'0' + n as u8;
    }
    ItoaBuf {
        buf,
        start: i as u8,
    }
}

/// A formatted decimal number, see [`itoa`].
pub(crate) struct ItoaBuf {
    buf: [u8; 20],
    start: u8,
}

impl ItoaBuf {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start as usize..]
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One stored message. See the [module documentation](self) for the line format.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope format version.
    pub v: u32,
    /// Message id.
    pub id: String,
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Message type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Per-(from, to) sequence number, starting at 1.
    pub seq: u64,
    /// Send time in microseconds since the Unix epoch.
    pub ts: u64,
    /// Id of the message this one replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Agents the message passed through, sender first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Vec<String>>,
    /// On a broadcast: the team it fans out to (`*` for every team).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<String>,
    /// On the request of a coordination round: how long hubs collect its replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gather: Option<Gather>,
    /// The payload, exactly as stored.
    pub payload: Box<RawValue>,
    /// Delivery count, present only on received messages, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<u32>,
}

impl Envelope {
    /// Parse one stored line (without its trailing newline).
    ///
    /// A line as this build writes it is read by a parser for that one shape, several times
    /// faster; any other line gets the general JSON parse, with the same result.
    ///
    /// # Errors
    /// The JSON error when the line is not an envelope.
    pub fn parse(line: &[u8]) -> serde_json::Result<Envelope> {
        match canonical::parse(line) {
            Some(e) => Ok(e),
            None => serde_json::from_slice(line),
        }
    }

    /// Send time in whole seconds since the Unix epoch.
    pub fn epoch_seconds(&self) -> u64 {
        self.ts / 1_000_000
    }

    /// Append the envelope as it is stored (the line [`Draft::encode_parts`] writes, without
    /// `delivery` and without a newline), keeping its version. For a line as this build
    /// writes it, that is the line itself.
    pub fn write_stored(&self, out: &mut Vec<u8>) {
        write_head(
            out,
            self.v,
            &self.id,
            Any(&self.from),
            Any(&self.to),
            &self.kind,
        );
        out.extend_from_slice(itoa(self.seq).as_bytes());
        write_tail(
            out,
            self.ts,
            self.reply_to.as_deref(),
            self.route.as_deref(),
            self.fanout.as_deref(),
            self.gather,
            self.payload.get(),
        );
    }

    /// The envelope as one JSON line, without a newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The coordination context of a round's request: replies are collected (by hubs) until the
/// deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gather {
    /// Milliseconds since the Unix epoch.
    pub deadline: u64,
}

/// The fields of a message before the store gives it a sequence number.
#[derive(Debug, Clone)]
pub struct Draft<'a> {
    /// Message id.
    pub id: String,
    /// Sender.
    pub from: &'a AgentId,
    /// Recipient.
    pub to: &'a AgentId,
    /// Message type (validated by [`validate_type`]).
    pub kind: &'a str,
    /// Send time in microseconds.
    pub ts: u64,
    /// Validated payload.
    pub payload: &'a Payload,
    /// Message this answers.
    pub reply_to: Option<&'a str>,
    /// Route so far.
    pub route: Option<&'a [String]>,
    /// Broadcast team (see [`Envelope::fanout`]).
    pub fanout: Option<&'a str>,
    /// Round context (see [`Envelope::gather`]).
    pub gather: Option<Gather>,
    /// The next hop, whose inbox the message is written to, when that is not `to` (a hub).
    pub via: Option<&'a AgentId>,
    /// A sequence number already given (a forwarded message keeps the one it got when sent).
    pub seq: Option<u64>,
}

impl Draft<'_> {
    /// The inbox this message is written to: the next hop, or the recipient.
    pub fn target(&self) -> &AgentId {
        self.via.unwrap_or(self.to)
    }

    /// The JSON line split around the sequence number: `prefix + seq + suffix` is the full line,
    /// newline included. The store fills in `seq` under the shard lock; everything costly is
    /// done before the lock is taken.
    pub fn encode_parts(&self, prefix: &mut Vec<u8>, suffix: &mut Vec<u8>) {
        prefix.clear();
        suffix.clear();
        write_head(
            prefix,
            ENVELOPE_VERSION,
            &self.id,
            Plain(self.from.as_str()), // ids need no escaping
            Plain(self.to.as_str()),
            self.kind,
        );
        write_tail(
            suffix,
            self.ts,
            self.reply_to,
            self.route,
            self.fanout,
            self.gather,
            self.payload.as_str(),
        );
        suffix.push(b'\n');
    }
}

/// A string known to need no JSON escaping (a validated agent id), or one that may.
enum Text<'a> {
    Plain(&'a str),
    Any(&'a str),
}
use Text::{Any, Plain};

/// The stored line up to the sequence number's value: `{"v":1,"id":..,"type":..,"seq":`.
fn write_head(out: &mut Vec<u8>, v: u32, id: &str, from: Text<'_>, to: Text<'_>, kind: &str) {
    let text = |out: &mut Vec<u8>, t: Text<'_>| match t {
        Plain(s) => {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Any(s) => write_json_str(out, s),
    };
    out.extend_from_slice(b"{\"v\":");
    out.extend_from_slice(itoa(u64::from(v)).as_bytes());
    out.extend_from_slice(b",\"id\":");
    write_json_str(out, id);
    out.extend_from_slice(b",\"from\":");
    text(out, from);
    out.extend_from_slice(b",\"to\":");
    text(out, to);
    out.extend_from_slice(b",\"type\":");
    write_json_str(out, kind);
    out.extend_from_slice(b",\"seq\":");
}

/// The stored line after the sequence number, without the newline.
fn write_tail(
    out: &mut Vec<u8>,
    ts: u64,
    reply_to: Option<&str>,
    route: Option<&[String]>,
    fanout: Option<&str>,
    gather: Option<Gather>,
    payload: &str,
) {
    out.extend_from_slice(b",\"ts\":");
    out.extend_from_slice(itoa(ts).as_bytes());
    if let Some(r) = reply_to {
        out.extend_from_slice(b",\"reply_to\":");
        write_json_str(out, r);
    }
    if let Some(route) = route {
        out.extend_from_slice(b",\"route\":[");
        for (i, hop) in route.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_str(out, hop);
        }
        out.push(b']');
    }
    if let Some(f) = fanout {
        out.extend_from_slice(b",\"fanout\":");
        write_json_str(out, f);
    }
    if let Some(g) = gather {
        out.extend_from_slice(b",\"gather\":{\"deadline\":");
        out.extend_from_slice(itoa(g.deadline).as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload.as_bytes());
    out.push(b'}');
}

pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    let plain = !needs_escape(s.as_bytes());
    if plain {
        // Printable ASCII without quote or backslash: nothing to escape (ids, common types).
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json's escaping; writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Whether `s` has a byte that is not printable ASCII, or a quote or backslash: eight bytes at
/// a time (ids are 25-35 bytes; a byte loop over a receiver state's 16 broadcast ids was a
/// sixth of a hybrid echo agent's instructions).
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of a byte of the result is set if that byte of `w` is below `n` (n <= 0x80)
    // or has its own high bit set, and no byte of the result is set if none is: exact for
    // "is there one".
    fn below(w: u64, n: u8) -> u64 {
        w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH
    }
    fn word(w: u64) -> bool {
        let zero = |x: u64| below(x, 1);
        (below(w, 0x20) | (w & HIGH) | zero(w ^ (ONES * 0x7f)) | zero(w ^ (ONES * u64::from(b'"'))))
            | zero(w ^ (ONES * u64::from(b'\\')))
            != 0
    }
    let load = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
    if s.len() < 8 {
        return s
            .iter()
            .any(|&b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\');
    }
    let mut chunks = s.chunks_exact(8);
    if chunks.by_ref().any(|c| word(load(c))) {
        return true;
    }
    // The last 8 bytes, overlapping what was checked: covers the remainder.
    !chunks.remainder().is_empty() && word(load(&s[s.len() - 8..]))
}

/// Why a message type is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidType {
    /// The type is the empty string.
    #[error("message type is empty")]
    Empty,
    /// The type is longer than [`MAX_TYPE_LEN`] bytes.
    #[error("message type is {0} bytes, longer than {MAX_TYPE_LEN}")]
    TooLong(usize),
}

/// Check a message type: 1 to [`MAX_TYPE_LEN`] bytes.
///
/// # Errors
/// [`InvalidType`].
pub fn validate_type(kind: &str) -> Result<(), InvalidType> {
    if kind.is_empty() {
        Err(InvalidType::Empty)
    } else if kind.len() > MAX_TYPE_LEN {
        Err(InvalidType::TooLong(kind.len()))
    } else {
        Ok(())
    }
}

/// A payload that has been checked to be one JSON value, on one line, within the size cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(String);

/// Why a payload is rejected.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The payload is the empty string.
    #[error("payload is empty (it must be a JSON value, e.g. '{{}}')")]
    Empty,
    /// The payload is larger than the cap.
    #[error(
        "payload is {size} bytes, over the {cap}-byte cap (raise it with --max-payload or SHOAL_MAX_PAYLOAD)"
    )]
    TooLarge {
        /// Size of the rejected payload.
        size: usize,
        /// The cap in force.
        cap: usize,
    },
    /// The payload is not valid JSON.
    #[error("payload is not valid JSON: {0}")]
    NotJson(serde_json::Error),
}

/// Default payload cap: 1 MiB, as the bash bus v1.1.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

impl Payload {
    /// Validate `text` as a JSON value of at most `cap` bytes.
    ///
    /// The payload is kept byte for byte, except that a payload spanning several lines has the
    /// whitespace outside its strings removed: one message must be one line.
    ///
    /// # Errors
    /// [`PayloadError`].
    ///
    /// # Examples
    /// ```
    /// use shoal::Payload;
    /// assert_eq!(Payload::parse("{\"n\": 1}", 1024).unwrap().as_str(), "{\"n\": 1}");
    /// assert_eq!(Payload::parse("{\n  \"n\": 1\n}", 1024).unwrap().as_str(), "{\"n\":1}");
    /// assert!(Payload::parse("not-json", 1024).is_err());
    /// ```
    pub fn parse(text: &str, cap: usize) -> Result<Payload, PayloadError> {
        if text.is_empty() {
            return Err(PayloadError::Empty);
        }
        if text.len() > cap {
            return Err(PayloadError::TooLarge {
                size: text.len(),
                cap,
            });
        }
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(PayloadError::NotJson)?;
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.contains(['\n', '\r']) {
            Ok(Payload(minify(trimmed)))
        } else {
            Ok(Payload(trimmed.to_owned()))
        }
    }

    /// The payload of a received message, taken as it is: it was validated (and made one line)
    /// when it was sent, so it is not checked again.
    pub fn from_received(raw: &RawValue) -> Payload {
        Payload(raw.get().to_owned())
    }

    /// A payload from a value that serializes to JSON.
    ///
    /// # Errors
    /// [`PayloadError::TooLarge`] over `cap`; [`PayloadError::NotJson`] if serialization fails.
    pub fn from_serialize<T: Serialize + ?Sized>(
        value: &T,
        cap: usize,
    ) -> Result<Payload, PayloadError> {
        let text = serde_json::to_string(value).map_err(PayloadError::NotJson)?;
        if text.len() > cap {
            return Err(PayloadError::TooLarge {
                size: text.len(),
                cap,
            });
        }
        Ok(Payload(text))
    }

    /// A payload this crate wrote itself, as one line of JSON (a hub's aggregate): only the
    /// size is checked.
    ///
    /// # Errors
    /// [`PayloadError::TooLarge`] over `cap`.
    pub(crate) fn from_written(text: String, cap: usize) -> Result<Payload, PayloadError> {
        debug_assert!(serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok());
        debug_assert!(!text.contains('\n'));
        if text.len() > cap {
            return Err(PayloadError::TooLarge {
                size: text.len(),
                cap,
            });
        }
        Ok(Payload(text))
    }

    /// The payload text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the payload is empty (never true for a validated payload).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Remove JSON whitespace outside strings. The input must be valid JSON.
fn minify(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_str = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn itoa_writes_what_display_writes(n: u64, digits in 0u32..20) {
            // Random numbers are nearly all 19-20 digits long: also one of every length.
            for n in [n, n % 10u64.pow(digits)] {
                let (ours, std) = (itoa(n), n.to_string());
                prop_assert_eq!(ours.as_bytes(), std.as_bytes());
            }
        }
    }

    proptest! {
        #[test]
        fn needs_escape_is_exactly_the_bytes_json_would_escape(s in "[ -~\\x00-\\x1f\\x7f\u{80}-\u{7ff}]{0,40}") {
            let slow = s.bytes().any(|b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\');
            prop_assert_eq!(needs_escape(s.as_bytes()), slow);
            let mut out = Vec::new();
            write_json_str(&mut out, &s);
            prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
        }
    }

    #[test]
    fn needs_escape_at_every_position_and_length() {
        for len in 0..40 {
            assert!(!needs_escape(&vec![b'a'; len]));
            for at in 0..len {
                for bad in [0x00, 0x1f, b'"', b'\\', 0x7f, 0x80, 0xff] {
                    let mut s = vec![b'a'; len];
                    s[at] = bad;
                    assert!(needs_escape(&s), "{len} {at} {bad}");
                }
                for good in [0x20, b'!', b'#', b'[', b']', b'~', b'0'] {
                    let mut s = vec![b'a'; len];
                    s[at] = good;
                    assert!(!needs_escape(&s), "{len} {at} {good}");
                }
            }
        }
    }

    #[test]
    fn itoa_edges() {
        for n in [0, 9, 10, 99, 100, 101, 999, 1000, u64::MAX] {
            assert_eq!(itoa(n).as_bytes(), n.to_string().as_bytes());
        }
    }

    #[test]
    fn ids_have_the_scripted_prefix_and_are_unique_in_process() {
        let g = IdGen::new();
        let a = g.next(1_795_310_779);
        let b = g.next(1_795_310_779);
        assert!(a.starts_with("msg-1795310779-"), "{a}");
        assert_ne!(a, b);
        let suffix = a.rsplit('-').next().unwrap();
        assert!(suffix.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn encoded_line_parses_back() {
        let from = AgentId::new("alice").unwrap();
        let to = AgentId::new("bob").unwrap();
        let payload = Payload::parse("{\"text\":\"a \\\"quoted\\\"\\nline\"}", 1024).unwrap();
        let route = vec!["alice".to_owned(), "hub-0".to_owned()];
        let d = Draft {
            id: "msg-1-2".into(),
            from: &from,
            to: &to,
            kind: "hello \"world\"",
            ts: 1_795_310_779_123_456,
            payload: &payload,
            reply_to: Some("msg-0-1"),
            route: Some(&route),
            fanout: Some("team-a"),
            gather: Some(Gather {
                deadline: 1_795_310_780_000,
            }),
            via: None,
            seq: None,
        };
        let (mut p, mut s) = (Vec::new(), Vec::new());
        d.encode_parts(&mut p, &mut s);
        let mut line = p.clone();
        line.extend_from_slice(b"7");
        line.extend_from_slice(&s);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(*line.last().unwrap(), b'\n');
        let e = Envelope::parse(&line[..line.len() - 1]).unwrap();
        assert_eq!(e.seq, 7);
        assert_eq!(e.kind, "hello \"world\"");
        assert_eq!(e.reply_to.as_deref(), Some("msg-0-1"));
        assert_eq!(e.route.as_deref(), Some(&route[..]));
        assert_eq!(e.fanout.as_deref(), Some("team-a"));
        assert_eq!(
            e.gather,
            Some(Gather {
                deadline: 1_795_310_780_000
            })
        );
        assert_eq!(e.payload.get(), payload.as_str());
        assert_eq!(e.delivery, None);
        // Serializing the parsed envelope gives the stored line back.
        assert_eq!(e.to_line().as_bytes(), &line[..line.len() - 1]);
    }

    #[test]
    fn payload_errors() {
        assert!(matches!(Payload::parse("", 10), Err(PayloadError::Empty)));
        assert!(matches!(
            Payload::parse("not-json", 100),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            Payload::parse("{} {}", 100),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            Payload::parse("[1,2,3]", 3),
            Err(PayloadError::TooLarge { size: 7, cap: 3 })
        ));
        assert_eq!(Payload::parse("  42\n", 100).unwrap().as_str(), "42");
    }

    proptest! {
        #[test]
        fn valid_ids_are_single_safe_components(s in "\\PC{0,80}") {
            if let Ok(id) = AgentId::new(&s) {
                prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= 64);
                prop_assert!(!id.as_str().starts_with('-'));
                prop_assert!(id.as_str() != "." && id.as_str() != "..");
                let p = std::path::Path::new(id.as_str());
                prop_assert_eq!(p.components().count(), 1);
                prop_assert!(matches!(p.components().next(), Some(std::path::Component::Normal(_))));
            }
        }

        #[test]
        fn id_regex_is_exactly_the_accepted_set(s in "[A-Za-z0-9_.\\-/ ]{0,70}") {
            let expect = !s.is_empty() && s.len() <= 64 && !s.starts_with('-')
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            prop_assert_eq!(AgentId::new(&s).is_ok(), expect);
        }

        #[test]
        fn minified_payload_is_one_line_and_same_value(v in arb_json()) {
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let p = Payload::parse(&pretty, usize::MAX).unwrap();
            prop_assert!(!p.as_str().contains('\n'));
            let back: serde_json::Value = serde_json::from_str(p.as_str()).unwrap();
            prop_assert_eq!(back, v);
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[ -~\\n\\t\"\\\\]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z \\n]{0,5}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
