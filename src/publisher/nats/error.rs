//! NATS errors, classified: which may succeed on a later attempt and which never will.

use crate::publisher::PublishError;

/// "No responders" to a JetStream publish, once JetStream said which stream covers the
/// subject. None: the event can never be stored there (permanent, until an operator adds a
/// stream and replays). One: the stream exists but nothing answered for it, which is what a
/// stream without a leader (an election, its servers restarting) looks like; the event waits
/// for it, uncounted, like any outage.
pub fn no_responders(subject: &str, stream: Option<&str>) -> PublishError {
    match stream {
        None => PublishError::permanent(format!(
            "nats: no JetStream stream covers subject {subject:?} (no responders)"
        )),
        Some(stream) => PublishError::unavailable(format!(
            "nats: stream {stream:?} covers subject {subject:?} but did not answer (no \
             responders: no leader, e.g. during an election); waiting for it"
        )),
    }
}

/// "No responders", and JetStream could not say which stream covers the subject: it is not
/// answering at all, so the event waits.
pub fn no_responders_unknown(subject: &str, why: &str) -> PublishError {
    PublishError::unavailable(format!(
        "nats: no responders for subject {subject:?}, and JetStream could not say which stream \
         covers it ({why}); waiting for it"
    ))
}

/// A JetStream API error as it arrives in a PubAck.
#[derive(Debug, serde::Deserialize)]
struct ApiError {
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// A PubAck's body: success unless it holds an error. The stream and sequence it also holds
/// are not needed, and a `duplicate` ack is a success (the stream has this event id).
#[derive(Debug, serde::Deserialize)]
struct PubAckBody {
    #[serde(default)]
    error: Option<ApiError>,
}

/// The result a PubAck's body stands for. Unavailable: JetStream's 503 (no leader, starting
/// up). Permanent: any other error JetStream answered (a wrong expected last sequence or
/// message id, a message the stream will not take), with its description. Retryable: a body
/// that is not a PubAck.
pub fn pub_ack(subject: &str, body: &[u8]) -> Result<(), PublishError> {
    match serde_json::from_slice::<PubAckBody>(body) {
        Ok(PubAckBody { error: None }) => Ok(()),
        Ok(PubAckBody { error: Some(e) }) => {
            let reason = format!(
                "nats: subject {subject:?}: {} (status code {}, JetStream error code {})",
                e.description, e.code, e.err_code
            );
            Err(if e.code == 503 {
                PublishError::unavailable(reason)
            } else {
                PublishError::permanent(reason)
            })
        }
        Err(e) => Err(PublishError::retryable(format!(
            "nats: subject {subject:?}: the PubAck could not be read ({e}): {}",
            crate::envelope::shown(&String::from_utf8_lossy(&body[..body.len().min(200)]))
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::ErrorKind;

    #[test]
    fn no_responders_fail_only_without_a_stream() {
        let none = no_responders("a.b", None);
        assert_eq!(none.kind, ErrorKind::Permanent);
        assert!(none
            .reason
            .contains("no JetStream stream covers subject \"a.b\""));
        let election = no_responders("a.b", Some("ORDERS"));
        assert_eq!(election.kind, ErrorKind::Unavailable);
        assert!(
            election.reason.contains("\"ORDERS\""),
            "{}",
            election.reason
        );
        assert_eq!(
            no_responders_unknown("a.b", "timed out").kind,
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn pub_acks() {
        assert_eq!(pub_ack("a", br#"{"stream":"S","seq":7}"#), Ok(()));
        assert_eq!(
            pub_ack("a", br#"{"stream":"S","seq":7,"duplicate":true}"#),
            Ok(())
        );
        let wrong = pub_ack(
            "a",
            br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#,
        )
        .unwrap_err();
        assert_eq!(wrong.kind, ErrorKind::Permanent);
        assert!(
            wrong.reason.contains("wrong last sequence: 3"),
            "{}",
            wrong.reason
        );
        assert!(wrong.reason.contains("10071"), "{}", wrong.reason);
        let away = pub_ack(
            "a",
            br#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#,
        )
        .unwrap_err();
        assert_eq!(away.kind, ErrorKind::Unavailable);
        let garbled = pub_ack("a", b"\xff not json").unwrap_err();
        assert_eq!(garbled.kind, ErrorKind::Retryable);
        assert!(
            garbled.reason.contains("could not be read"),
            "{}",
            garbled.reason
        );
    }
}
