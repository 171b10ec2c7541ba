//! Kafka errors, classified: which may succeed on a later attempt and which never will.

use crate::publisher::PublishError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Errors that retrying cannot fix: the message, the topic or our rights are wrong.
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::UnknownTopic
            | C::UnknownPartition
            | C::UnknownTopicOrPartition
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::PolicyViolation
            | C::InvalidRequiredAcks
            | C::UnsupportedForMessageFormat
            | C::UnsupportedCompressionType
            | C::InvalidArgument
    )
}

/// Errors that say nothing about the message: no broker reached or none answered in time.
fn is_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageTimedOut
            | C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::RequestTimedOut
            | C::NetworkException
            | C::QueueFull
            | C::Resolve
            | C::OperationTimedOut
    )
}

/// Errors about the producer's own state, not the message: an idempotent producer whose epoch
/// or sequence the broker no longer accepts (after a broker restart or a long freeze, say), a
/// fatal producer error, or our own purge of what a replaced producer still held. The message
/// was never judged, so no attempt is spent on it; the producer is replaced (see `heal`) and
/// the message is sent again through the new one.
pub fn is_producer_state(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal
            | C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping
            | C::OutOfOrderSequenceNumber
            | C::UnknownProducerId
            | C::PurgeQueue
            | C::PurgeInflight
    )
}

/// A delivery report's error as a result for the ACK channel, with the broker's reason.
/// Queue full, timeouts, transport failures, leader changes and anything not known to be
/// permanent are retryable: a wrong "retryable" costs attempts, a wrong "permanent" an event.
pub fn classify(err: &KafkaError) -> PublishError {
    let code = err.rdkafka_error_code();
    let reason = format!("kafka: {err}");
    match code {
        Some(c) if is_permanent(c) => PublishError::permanent(reason),
        Some(c) if is_unavailable(c) || is_producer_state(c) => PublishError::unavailable(reason),
        _ => PublishError::retryable(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::ErrorKind;

    #[test]
    fn classification() {
        let e = classify(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(e.reason.contains("too large"), "{}", e.reason);
        for code in [
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)).kind,
                ErrorKind::Unavailable,
                "{code:?}: no broker answered about the message"
            );
        }
        assert_eq!(
            classify(&KafkaError::MessageProduction(
                RDKafkaErrorCode::NotEnoughReplicas
            ))
            .kind,
            ErrorKind::Retryable,
            "the broker answered about the message: counted as an attempt"
        );
        for code in [
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
            RDKafkaErrorCode::UnknownProducerId,
            RDKafkaErrorCode::InvalidProducerIdMapping,
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::PurgeQueue,
            RDKafkaErrorCode::PurgeInflight,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)).kind,
                ErrorKind::Unavailable,
                "{code:?}: about the producer, not the message; no attempt spent"
            );
        }
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)).kind,
                ErrorKind::Permanent,
                "{code:?}"
            );
        }
    }
}
