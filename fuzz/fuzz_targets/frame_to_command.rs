//! Inbound frame -> command: the path every client text frame takes.
//!
//! Arbitrary bytes stand for a WebSocket payload; tungstenite only hands the
//! broker valid UTF-8 (invalid UTF-8 is close 1007), so non-UTF-8 inputs stop
//! there. A publish is encoded the way subscribers receive it, and that frame
//! must be JSON whose `data` is the publisher's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbroker::protocol::{self, Command};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match protocol::parse_command(text) {
        Ok(Command::Publish { topic, data, id }) => {
            assert!(protocol::validate_topic(&topic, false).is_ok());
            let frame = protocol::encode_message(&topic, data.get());
            match serde_json::from_str::<serde_json::Value>(&frame) {
                Ok(v) => {
                    assert_eq!(v["type"], "message");
                    assert_eq!(v["topic"].as_str(), Some(topic.as_ref()));
                }
                // Passed through verbatim by design (see docs/security.md):
                // the JSON grammar allows numbers beyond f64 (1e400) and
                // unpaired surrogate escapes ("\ud800"); serde_json's Value
                // refuses both. Any other parse error is a bug.
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("number out of range")
                            || e.contains("surrogate")
                            || e.contains("hex escape"),
                        "{e}: {frame}"
                    );
                }
            }
            let prefix = format!(r#"{{"type":"message","topic":"{topic}","data":"#);
            assert!(frame.starts_with(&prefix));
            assert_eq!(&frame[prefix.len()..frame.len() - 1], data.get());
            if let Some(id) = id {
                let _ = protocol::encode_ack(id);
            }
        }
        Ok(Command::Subscribe { topic, .. } | Command::Unsubscribe { topic, .. }) => {
            assert!(protocol::validate_topic(&topic, true).is_ok());
        }
        Err(rejection) => {
            let _ = protocol::encode_error(rejection.id, rejection.code, &rejection.message);
        }
    }
});
