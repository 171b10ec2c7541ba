//! NATS errors, classified: which may succeed on a later attempt and which never will.

use crate::publisher::PublishError;
use async_nats::jetstream::context::{PublishError as JsPublishError, PublishErrorKind};

/// A JetStream publish (or its PubAck) failure as a result for the ACK channel.
///
/// Permanent, with the server's reason: no stream covers the subject (no responders), the
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
