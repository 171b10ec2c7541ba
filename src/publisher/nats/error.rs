//! NATS errors, classified: which may succeed on a later attempt and which never will.

use crate::publisher::PublishError;
use async_nats::jetstream::context::{PublishError as JsPublishError, PublishErrorKind};

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

/// A JetStream publish (or its PubAck) failure as a result for the ACK channel.
///
/// Permanent, with the server's reason: no stream covers the subject (no responders; a
/// PubAck's "no responders" goes through [`no_responders`] first), the
/// message is larger than the server or the stream allows, a wrong expected last sequence or
/// message id, and any error the JetStream API answered with (other than "unavailable").
/// Retryable: timeouts, a broken connection, a full window.
pub fn classify(subject: &str, err: &JsPublishError) -> PublishError {
    let reason = format!("nats: subject {subject:?}: {err}");
    match err.kind() {
        PublishErrorKind::StreamNotFound => PublishError::permanent(format!(
            "nats: no JetStream stream covers subject {subject:?} (no responders)"
        )),
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => PublishError::permanent(reason),
        // No answer from the server about this message: it waits for the server.
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => PublishError::unavailable(reason),
        PublishErrorKind::Other => {
            let api = std::error::Error::source(err)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
            match api {
                // 503: JetStream is not available right now (no leader, starting up).
                Some(e) if e.code() != 503 => PublishError::permanent(reason),
                Some(_) => PublishError::unavailable(reason),
                _ => PublishError::retryable(reason),
            }
        }
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
    fn classification() {
        let e = classify(
            "a.b",
            &JsPublishError::new(PublishErrorKind::StreamNotFound),
        );
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(e
            .reason
            .contains("no JetStream stream covers subject \"a.b\""));
        for k in [PublishErrorKind::TimedOut, PublishErrorKind::BrokenPipe] {
            assert_eq!(
                classify("a", &JsPublishError::new(k)).kind,
                ErrorKind::Unavailable
            );
        }
        assert_eq!(
            classify(
                "a",
                &JsPublishError::new(PublishErrorKind::MaxPayloadExceeded)
            )
            .kind,
            ErrorKind::Permanent
        );
        assert_eq!(
            classify("a", &JsPublishError::new(PublishErrorKind::Other)).kind,
            ErrorKind::Retryable
        );
    }
}
