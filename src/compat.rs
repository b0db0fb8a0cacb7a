//! The bash `message-bus.sh` interface: its exact output formats.
//!
//! `receive` prints a JSON array built the way the bash script builds it (`[`, each message
//! file's text, `,` between them, `]`, one per line), and each message in the file format the
//! script wrote:
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

use crate::envelope::Envelope;
pub use crate::store::compat::{BASH_MESSAGE_VERSION, bash_message};

/// The output of the bash bus's `receive`: `[]` for none, else the messages as a JSON array,
/// oldest first, exactly as the script prints it. Ends with a newline.
pub fn bash_receive_output(messages: &[Envelope]) -> String {
    if messages.is_empty() {
        return "[]\n".to_owned();
    }
    let mut out = String::from("[\n");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push_str(",\n");
        }
        out.push_str(&bash_message(m));
        out.push('\n');
    }
    out.push_str("]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str, seq: u64, payload: &str) -> Envelope {
        Envelope::parse(
            format!(
                r#"{{"v":1,"id":"{id}","from":"alice","to":"bob","type":"hello","seq":{seq},"ts":1795310779123456,"payload":{payload}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn receive_output_matches_the_bash_script_byte_for_byte() {
        assert_eq!(bash_receive_output(&[]), "[]\n");
        let out =
            bash_receive_output(&[env("msg-1-1", 1, r#"{"n":1}"#), env("msg-1-2", 2, "[1, 2]")]);
        let expect = "[\n{\n  \"version\": \"1.0\",\n  \"msg_id\": \"msg-1-1\",\n  \"from\": \"alice\",\n  \"to\": \"bob\",\n  \"timestamp\": 1795310779,\n  \"sequence\": 1,\n  \"type\": \"hello\",\n  \"payload\": {\"n\":1},\n  \"requires_ack\": false\n}\n,\n{\n  \"version\": \"1.0\",\n  \"msg_id\": \"msg-1-2\",\n  \"from\": \"alice\",\n  \"to\": \"bob\",\n  \"timestamp\": 1795310779,\n  \"sequence\": 2,\n  \"type\": \"hello\",\n  \"payload\": [1, 2],\n  \"requires_ack\": false\n}\n]\n";
        assert_eq!(out, expect);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed.as_array().unwrap().len(), 2);
    }
}
