//! A parser for envelope lines exactly as this build writes them ([`Draft::encode_parts`]).
//!
//! Every line a receiver reads was, nearly always, written by `encode_parts`: keys in one
//! order, strings without escapes, integers without signs or exponents. Reading such a line
//! by walking that shape costs a fraction of the general JSON parse (in a 1000-agent round the
//! coordinator and the hubs parse one reply per agent, and every agent parses its request).
//!
//! The parser is all or nothing: it accepts a line only if it can vouch that the general
//! parse ([`serde_json`] through `Deserialize`) would give the same envelope, and returns
//! `None` otherwise (an escape in a string, another key order, an unknown or a duplicated key,
//! whitespace, a number serde would reject), and the caller then does the general parse. The
//! payload is still checked as JSON, as the general parse would check it.
//!
//! [`Draft::encode_parts`]: super::Draft::encode_parts

use serde_json::value::RawValue;

use super::{Envelope, Gather};

/// The envelope in `line` if it has the canonical shape, else `None`.
pub(super) fn parse(line: &[u8]) -> Option<Envelope> {
    // Checked once: every slice taken below starts and ends next to an ASCII delimiter, so it
    // is valid UTF-8 too.
    let mut c = Cursor::new(std::str::from_utf8(line).ok()?);
    let e = c.envelope()?;
    c.end()?;
    Some(e)
}

/// The replies of a hub's aggregate (a [`BATCH_TYPE`] payload) if it has the shape hubs write:
/// `{"request":..,"team":..,"replies":[<envelope>,..],"missing":[<id>,..]}`, every envelope
/// canonical. `None` for anything else; the general parse then decides.
///
/// [`BATCH_TYPE`]: crate::coord::round::BATCH_TYPE
pub(crate) fn batch_replies(payload: &str) -> Option<Vec<Envelope>> {
    let mut c = Cursor::new(payload);
    c.lit(b"{\"request\":")?;
    c.skip_string()?;
    c.lit(b",\"team\":")?;
    c.skip_string()?;
    c.lit(b",\"replies\":[")?;
    let mut replies = Vec::new();
    c.list(|c| {
        replies.push(c.envelope()?);
        Some(())
    })?;
    c.lit(b",\"missing\":[")?;
    c.list(Cursor::skip_string)?;
    c.lit(b"}")?;
    c.end()?;
    Some(replies)
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

struct Cursor<'a> {
    b: &'a [u8],
    /// `b` as text.
    text: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Cursor<'a> {
        Cursor {
            b: text.as_bytes(),
            text,
            i: 0,
        }
    }

    /// Nothing left.
    fn end(&self) -> Option<()> {
        (self.i == self.b.len()).then_some(())
    }

    /// One envelope object, keys in the written order, ending after its closing brace.
    fn envelope(&mut self) -> Option<Envelope> {
        let v = u32::try_from(self.after(b"{\"v\":", Self::num)?).ok()?;
        let id = self.after(b",\"id\":", Self::string)?;
        let from = self.after(b",\"from\":", Self::string)?;
        let to = self.after(b",\"to\":", Self::string)?;
        let kind = self.after(b",\"type\":", Self::string)?;
        let seq = self.after(b",\"seq\":", Self::num)?;
        let ts = self.after(b",\"ts\":", Self::num)?;
        let reply_to = self.optional(b",\"reply_to\":", Self::string)?;
        let route = self.optional(b",\"route\":[", |c| {
            let mut hops = Vec::new();
            c.list(|c| {
                hops.push(c.string()?);
                Some(())
            })?;
            Some(hops)
        })?;
        let fanout = self.optional(b",\"fanout\":", Self::string)?;
        let gather = self.optional(b",\"gather\":{\"deadline\":", |c| {
            let deadline = c.num()?;
            c.lit(b"}")?;
            Some(Gather { deadline })
        })?;
        self.lit(b",\"payload\":")?;
        let payload = self.raw_value()?;
        self.lit(b"}")?;
        Some(Envelope {
            v,
            id,
            from,
            to,
            kind,
            seq,
            ts,
            reply_to,
            route,
            fanout,
            gather,
            payload,
            delivery: None,
        })
    }

    /// One JSON value, checked as the general parse checks it. Whitespace before it is left
    /// to the general parse (whose raw value would not include it); whitespace after it
    /// fails the literal that follows.
    fn raw_value(&mut self) -> Option<Box<RawValue>> {
        let rest = self.b.get(self.i..)?;
        if is_space(*rest.first()?) {
            return None;
        }
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Box<RawValue>>();
        let value = values.next()?.ok()?;
        self.i += values.byte_offset();
        Some(value)
    }

    /// `key` (exactly), then what `value` reads.
    fn after<T>(&mut self, key: &[u8], value: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        self.lit(key)?;
        value(self)
    }

    /// An optional key: `Some(None)` if `key` does not come next, `Some(Some(..))` with what
    /// `value` reads after it, `None` if that fails.
    fn optional<T>(
        &mut self,
        key: &[u8],
        value: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        if !self.maybe(key) {
            return Some(None);
        }
        value(self).map(Some)
    }

    /// The rest of a `[`-opened list: `]`, or items separated by `,` and closed by `]`.
    fn list(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if self.maybe(b"]") {
            return Some(());
        }
        loop {
            item(self)?;
            if self.maybe(b"]") {
                return Some(());
            }
            self.lit(b",")?;
        }
    }

    /// Exactly `s` next.
    fn lit(&mut self, s: &[u8]) -> Option<()> {
        self.maybe(s).then_some(())
    }

    /// Skip `s` if it comes next.
    fn maybe(&mut self, s: &[u8]) -> bool {
        let hit = self.b[self.i..].starts_with(s);
        if hit {
            self.i += s.len();
        }
        hit
    }

    /// An integer as serde reads a `u64`: `0` or digits not starting with 0, no sign, no
    /// fraction or exponent (those end the number here and fail the next literal).
    fn num(&mut self) -> Option<u64> {
        let digits = self.b[self.i..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let text = &self.b[self.i..self.i + digits];
        if digits == 0 || (digits > 1 && text[0] == b'0') {
            return None;
        }
        let digit = |d: &u8| u64::from(d - b'0');
        // Up to 19 digits cannot overflow; only a 20th needs checking.
        let (head, last) = text.split_at(digits.min(19));
        let mut n = head.iter().fold(0u64, |n, d| n * 10 + digit(d));
        if let Some(d) = last.first() {
            if last.len() > 1 {
                return None;
            }
            n = n.checked_mul(10)?.checked_add(digit(d))?;
        }
        self.i += digits;
        Some(n)
    }

    /// A string without escapes: bytes other than `"`, `\\` and control characters.
    fn string(&mut self) -> Option<String> {
        let (start, len) = self.string_span()?;
        Some(self.text.get(start..start + len)?.to_owned())
    }

    fn skip_string(&mut self) -> Option<()> {
        self.string_span().map(|_| ())
    }

    /// Where the string's text starts and how long it is; the cursor moves past it.
    fn string_span(&mut self) -> Option<(usize, usize)> {
        self.lit(b"\"")?;
        let start = self.i;
        let len = memchr::memchr(b'"', &self.b[start..])?;
        if self.b[start..start + len]
            .iter()
            .any(|&b| b == b'\\' || b < 0x20)
        {
            return None;
        }
        self.i += len + 1;
        Some((start, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{AgentId, Draft, Payload};
    use proptest::prelude::*;

    fn general(line: &[u8]) -> Option<Envelope> {
        serde_json::from_slice(line).ok()
    }

    fn same(a: &Envelope, b: &Envelope) -> bool {
        format!("{a:?}") == format!("{b:?}") && a.payload.get() == b.payload.get()
    }

    /// A written line (no newline) for these fields.
    #[allow(clippy::too_many_arguments)]
    fn written(
        kind: &str,
        id: &str,
        payload: &str,
        reply_to: Option<&str>,
        route: Option<&[String]>,
        fanout: Option<&str>,
        gather: Option<u64>,
        seq: u64,
        ts: u64,
    ) -> Vec<u8> {
        let from = AgentId::new("agent-0001").unwrap();
        let to = AgentId::new("coord").unwrap();
        let payload = Payload::parse(payload, usize::MAX).unwrap();
        let d = Draft {
            id: id.to_owned(),
            from: &from,
            to: &to,
            kind,
            ts,
            payload: &payload,
            reply_to,
            route,
            fanout,
            gather: gather.map(|deadline| Gather { deadline }),
            via: None,
            seq: None,
        };
        let (mut p, mut s) = (Vec::new(), Vec::new());
        d.encode_parts(&mut p, &mut s);
        p.extend_from_slice(crate::envelope::itoa(seq).as_bytes());
        p.extend_from_slice(&s);
        p.pop(); // the newline
        p
    }

    #[test]
    fn written_lines_take_the_short_way() {
        let route = ["coord".to_owned(), "hub-0".to_owned()];
        for line in [
            written("ping", "msg-1-2", "{}", None, None, None, None, 1, 2),
            written(
                "ping.reply",
                "msg-1-3",
                "{\"n\":[1,2,{\"x\":\"é\"}]}",
                Some("msg-1-2"),
                Some(&route),
                Some("*"),
                Some(17),
                u64::MAX,
                0,
            ),
            written("t", "m", "  \"s\" ", None, Some(&[]), None, None, 9, 10),
        ] {
            let fast = parse(&line).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&line)));
            assert!(same(&fast, &general(&line).unwrap()));
        }
    }

    #[test]
    fn written_back_an_envelope_keeps_its_version() {
        let line =
            br#"{"v":2,"id":"m","from":"a","to":"b","type":"t","seq":1,"ts":1,"payload":{}}"#;
        let e = parse(line).unwrap();
        let mut back = Vec::new();
        e.write_stored(&mut back);
        assert_eq!(back, line);
    }

    #[test]
    fn anything_else_is_left_to_the_general_parse() {
        let base = String::from_utf8(written(
            "ping",
            "msg-1-2",
            "{}",
            Some("msg-0-1"),
            None,
            None,
            None,
            4,
            5,
        ))
        .unwrap();
        let variants = [
            base.replace("\"type\":\"ping\"", "\"type\":\"p\\u0069ng\""), // escape
            base.replace("\"seq\":4", "\"seq\":04"),                      // serde rejects
            base.replace("\"seq\":4", "\"seq\":4.0"),
            base.replace("\"seq\":4", "\"seq\":-4"),
            base.replace("\"ts\":5", "\"ts\":99999999999999999999"), // overflow
            base.replace("\"v\":1", "\"v\":4294967296"),
            base.replace("{\"v\":1,", "{ \"v\":1,"),
            base.replace("\"payload\":{}", "\"payload\": {}"),
            base.replace("\"payload\":{}", "\"payload\":{} "),
            base.replace("\"payload\":{}", "\"payload\":{},\"delivery\":2"),
            base.replace("\"payload\":{}", "\"payload\":{},\"x\":1"),
            base.replace("\"payload\":{}", "\"payload\":{}}"),
            base.replace("\"payload\":{}", "\"payload\":{"),
            base.replace("\"payload\":{}", "\"payload\":"),
            base.replace("\"reply_to\":\"msg-0-1\"", "\"reply_to\":null"),
            base.replace(
                ",\"reply_to\":\"msg-0-1\"",
                ",\"reply_to\":\"a\",\"reply_to\":\"b\"",
            ),
            base.replace("\"id\":\"msg-1-2\"", "\"id\":\"a\tb\""), // control character
            base.clone() + " ",
            base[..base.len() - 1].to_owned(),
        ];
        for v in &variants {
            assert!(parse(v.as_bytes()).is_none(), "{v}");
        }
        let mut bad_utf8 = base.into_bytes();
        let at = bad_utf8.iter().position(|&b| b == b'p').unwrap();
        bad_utf8[at] = 0xff;
        assert!(parse(&bad_utf8).is_none());
    }

    fn text() -> impl Strategy<Value = String> {
        // Mostly plain, sometimes quotes, backslashes, control characters or non-ASCII.
        prop_oneof![
            4 => "[a-z0-9._-]{1,12}",
            1 => "\\PC{0,8}",
            1 => "[ -~\\t\\n\"\\\\é€]{1,8}",
        ]
    }

    fn payload() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("{}".to_owned()),
            "[1-9][0-9]{0,3}",
            text().prop_map(|s| serde_json::to_string(&s).unwrap()),
            (text(), 0i64..1000).prop_map(|(k, n)| format!(
                "{{{}:[{n},true,null]}}",
                serde_json::to_string(&k).unwrap()
            )),
        ]
    }

    proptest! {
        /// Whatever a written line holds, the short way agrees with the general parse, and
        /// it is taken whenever no string needs escaping.
        #[test]
        fn agrees_with_the_general_parse_on_written_lines(
            kind in text(),
            id in text(),
            body in payload(),
            reply_to in proptest::option::of(text()),
            route in proptest::option::of(prop::collection::vec(text(), 0..3)),
            fanout in proptest::option::of(text()),
            gather in proptest::option::of(any::<u64>()),
            seq in any::<u64>(),
            ts in any::<u64>(),
        ) {
            let line = written(
                &kind, &id, &body, reply_to.as_deref(), route.as_deref(), fanout.as_deref(),
                gather, seq, ts,
            );
            let want = general(&line).expect("a written line parses");
            let plain = |s: &str| !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
            let all_plain = [&kind, &id].iter().all(|s| plain(s))
                && reply_to.as_deref().is_none_or(plain)
                && fanout.as_deref().is_none_or(plain)
                && route.iter().flatten().all(|s| plain(s));
            // Written back as stored, it is the line again.
            let mut back = Vec::new();
            want.write_stored(&mut back);
            prop_assert_eq!(&back, &line);
            match parse(&line) {
                Some(fast) => prop_assert!(same(&fast, &want)),
                None => prop_assert!(!all_plain, "plain line refused: {}", String::from_utf8_lossy(&line)),
            }
        }

        /// On any damaged line the short way either refuses or agrees.
        #[test]
        fn never_disagrees_on_damaged_lines(
            body in payload(),
            cut in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            how in 0u8..3,
        ) {
            let route = ["a".to_owned()];
            let mut line = written(
                "ping", "msg-1-2", &body, Some("msg-0-1"), Some(&route), Some("*"), Some(3), 7, 8,
            );
            let at = cut.index(line.len());
            match how {
                0 => line[at] = byte,
                1 => line.insert(at, byte),
                _ => { line.remove(at); }
            }
            if let Some(fast) = parse(&line) {
                let want = general(&line);
                prop_assert!(want.is_some(), "accepted what serde refuses: {}", String::from_utf8_lossy(&line));
                prop_assert!(same(&fast, &want.unwrap()));
            }
        }
    }
}
