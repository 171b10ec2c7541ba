//! Pulsar errors, classified: which may succeed on a later attempt and which never will.

use crate::publisher::PublishError;
use pulsar::error::{ConnectionError, ProducerError, ServiceDiscoveryError};
use pulsar::message::proto::ServerError;
use pulsar::Error;

/// The broker's own verdict, where the error carries one.
fn server_error(err: &Error) -> Option<(ServerError, Option<&str>)> {
    let conn = match err {
        Error::Connection(c) => c,
        Error::Producer(ProducerError::Connection(c)) => c,
        Error::Producer(ProducerError::Batch(inner)) => return server_error(inner),
        Error::ServiceDiscovery(ServiceDiscoveryError::Query(Some(kind), msg)) => {
            return Some((*kind, msg.as_deref()))
        }
        Error::ServiceDiscovery(ServiceDiscoveryError::Connection(c)) => c,
        _ => return None,
    };
    match conn {
        ConnectionError::PulsarError(Some(kind), msg) => Some((*kind, msg.as_deref())),
        _ => None,
    }
}

/// Errors that retrying cannot fix: the topic, the message or our rights are wrong.
fn is_permanent(kind: ServerError) -> bool {
    use ServerError as E;
    matches!(
        kind,
        E::AuthenticationError
            | E::AuthorizationError
            | E::TopicNotFound
            | E::TopicTerminatedError
            | E::InvalidTopicName
            | E::IncompatibleSchema
            | E::NotAllowedError
            | E::UnsupportedVersionError
    )
}

/// Nothing was learned about the message: the broker was not reached or did not answer in
/// time, or it asks to come back later.
fn is_unavailable_server(kind: ServerError) -> bool {
    use ServerError as E;
    matches!(
        kind,
        E::ServiceNotReady
            | E::TooManyRequests
            | E::ProducerBusy
            | E::ProducerBlockedQuotaExceededError
            | E::ProducerBlockedQuotaExceededException
            | E::MetadataError
            | E::PersistenceError
    )
}

fn is_unavailable_connection(c: &ConnectionError) -> bool {
    matches!(
        c,
        ConnectionError::Authentication(pulsar::error::AuthenticationError::Retriable(_))
            | ConnectionError::Io(_)
            | ConnectionError::Disconnected
            | ConnectionError::SlowDown
            | ConnectionError::Canceled
            | ConnectionError::Shutdown
            | ConnectionError::NotFound
    )
}

/// A send's (or a producer creation's) error as a result for the ACK channel, with the
/// broker's reason. Anything not known to be permanent may succeed later: a wrong "retryable"
/// costs attempts, a wrong "permanent" an event.
///
/// A batched message's error wraps the batch's (classified as that one). The broker's refusal
/// of a sent message (`CommandSendError`) reaches pulsar-rs' callers as an unexpected
/// response, so it is retryable: only lookups and producer creation carry the broker's
/// verdict as such.
pub fn classify(err: &Error) -> PublishError {
    if let Error::Producer(ProducerError::Batch(inner)) = err {
        let mut e = classify(inner);
        e.reason = format!("pulsar: {err}");
        return e;
    }
    let reason = format!("pulsar: {err}");
    if let Some((kind, _)) = server_error(err) {
        return if is_permanent(kind) {
            PublishError::permanent(reason)
        } else if is_unavailable_server(kind) {
            PublishError::unavailable(reason)
        } else {
            PublishError::retryable(reason)
        };
    }
    let unavailable = match err {
        Error::Connection(c) => is_unavailable_connection(c),
        Error::Producer(ProducerError::Connection(c)) => is_unavailable_connection(c),
        // Io is compression, which fails the same way every time: retryable, below.
        Error::ServiceDiscovery(ServiceDiscoveryError::Connection(c)) => {
            is_unavailable_connection(c)
        }
        Error::ServiceDiscovery(
            ServiceDiscoveryError::DnsLookupError
            | ServiceDiscoveryError::Canceled
            | ServiceDiscoveryError::Shutdown,
        ) => true,
        Error::Executor => true,
        _ => false,
    };
    if unavailable {
        PublishError::unavailable(reason)
    } else {
        PublishError::retryable(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::ErrorKind;

    fn server(kind: ServerError, msg: &str) -> Error {
        Error::Producer(ProducerError::Connection(ConnectionError::PulsarError(
            Some(kind),
            Some(msg.into()),
        )))
    }

    #[test]
    fn the_brokers_verdicts_are_classified_with_its_reason() {
        let e = classify(&server(ServerError::TopicTerminatedError, "terminated"));
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(e.reason.contains("terminated"), "{}", e.reason);
        for k in [
            ServerError::AuthorizationError,
            ServerError::InvalidTopicName,
            ServerError::TopicNotFound,
        ] {
            assert_eq!(
                classify(&server(k, "x")).kind,
                ErrorKind::Permanent,
                "{k:?}"
            );
        }
        for k in [
            ServerError::ServiceNotReady,
            ServerError::ProducerBusy,
            ServerError::TooManyRequests,
            ServerError::ProducerBlockedQuotaExceededError,
        ] {
            assert_eq!(
                classify(&server(k, "x")).kind,
                ErrorKind::Unavailable,
                "{k:?}"
            );
        }
        assert_eq!(
            classify(&server(ServerError::ChecksumError, "x")).kind,
            ErrorKind::Retryable
        );
        let batch = Error::Producer(ProducerError::Batch(std::sync::Arc::new(server(
            ServerError::NotAllowedError,
            "no",
        ))));
        assert_eq!(classify(&batch).kind, ErrorKind::Permanent);
        let compression = Error::Producer(ProducerError::Io(std::io::Error::other("lz4")));
        assert_eq!(classify(&compression).kind, ErrorKind::Retryable);
    }

    #[test]
    fn a_broker_away_is_unavailable() {
        let io = Error::Producer(ProducerError::Connection(ConnectionError::Io(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "not acknowledged"),
        )));
        assert_eq!(classify(&io).kind, ErrorKind::Unavailable);
        let gone = Error::Connection(ConnectionError::Disconnected);
        assert_eq!(classify(&gone).kind, ErrorKind::Unavailable);
        // Batching is on by default: a batch's expiry or lost connection is every message's.
        for inner in [io, gone] {
            let batched = Error::Producer(ProducerError::Batch(std::sync::Arc::new(inner)));
            let e = classify(&batched);
            assert_eq!(e.kind, ErrorKind::Unavailable, "{}", e.reason);
        }
        let other = Error::Custom("odd".into());
        assert_eq!(classify(&other).kind, ErrorKind::Retryable);
    }
}
