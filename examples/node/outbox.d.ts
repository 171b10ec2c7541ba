// The outbox table's rows as TypeScript types (see the table in the top-level README and
// migrations/0001_create_outbox.sql). Producers write a NewOutboxEvent; OutboxRow is the whole
// row as stored, for tools that read the table.

/** Header names and values; sent as message headers. Never the relay's own names. */
export type OutboxHeaders = Record<string, string>;

/** The columns a producer writes. Optional ones may be left out (NULL or their default). */
export interface NewOutboxEvent {
  /** Unique; the idempotency key, sent as X-Event-ID (and Nats-Msg-Id). */
  event_id: string;
  /** 1-255 printable ASCII characters, no spaces; chooses the route. */
  topic: string;
  /** The ordering key (and Kafka message key). */
  aggregate_id: string;
  aggregate_type?: string | null;
  event_type: string;
  /** 1 or more; default 1. */
  event_version?: number;
  /** Any bytes: JSON, protobuf, Avro. */
  payload: Buffer;
  headers?: OutboxHeaders | null;
  /** Sent as content-type. */
  content_type?: string | null;
  /** W3C trace context, sent as traceparent. */
  traceparent?: string | null;
  /** Sent as X-Correlation-ID. */
  correlation_id?: string | null;
  /** Default now(). */
  occurred_at?: Date;
}

export type OutboxStatus = "pending" | "failed" | "published";

/** A row as stored: the producer's columns plus those the relay owns. */
export interface OutboxRow extends Required<Omit<NewOutboxEvent, "occurred_at">> {
  /** bigint: node-postgres returns it as a string. */
  id: string;
  occurred_at: Date;
  status: OutboxStatus;
  attempts: number;
  next_attempt_at: Date;
  last_error: string | null;
  published_at: Date | null;
  /** The aggregate's partition (0-255), computed by Postgres. */
  part: number;
}
