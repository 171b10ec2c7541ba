#!/usr/bin/env python3
"""A minimal consumer of what outbox-relay publishes to Kafka (confluent-kafka).

It reads every route format the relay has (raw, envelope, CloudEvents binary and structured),
skips redeliveries by event id, continues the producer's trace, and prints one JSON line per
message. docs/CONSUMERS.md explains each step; tests/cloudevents.rs runs this file.

    pip install 'confluent-kafka>=2.3,<3'
    python3 kafka_consumer.py --brokers 127.0.0.1:9092 --topic orders.created --group billing \
        --store processed.sqlite

Deduplication: the event id goes into a `processed` table in the same SQLite transaction as
the consumer's own effect (here, a row in `effects`), so a redelivered event is seen as done
however the consumer crashed. A real consumer uses its own database the same way. Offsets are
committed after the transaction, so a crash in between redelivers, and the table catches it.
"""

import argparse
import base64
import json
import os
import sqlite3
import sys
import time

try:
    from confluent_kafka import Consumer, KafkaException
except ImportError as e:
    sys.exit(f"kafka_consumer.py: {e}; pip install 'confluent-kafka>=2.3,<3' "
             "(or: source scripts/consumer-tools.sh && ensure_consumer_tools)")

STRUCTURED = "application/cloudevents"


def open_store(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS processed (event_id TEXT PRIMARY KEY)")
    db.execute("CREATE TABLE IF NOT EXISTS effects (event_id TEXT, aggregate_id TEXT, type TEXT)")
    return db


def child_traceparent(traceparent):
    """The W3C traceparent of this consumer's span, a child of the message's. With
    OpenTelemetry, `TraceContextTextMapPropagator().extract(headers)` does the same."""
    parts = (traceparent or "").split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None, None
    return parts[1], f"00-{parts[1]}-{os.urandom(8).hex()}-{parts[3]}"


def decode(headers, value):
    """(format, event type, payload bytes, content type) of a message in any route format."""
    content_type = headers.get("content-type", "")
    if content_type.lower().startswith(STRUCTURED):
        event = json.loads(value)
        if "data_base64" in event:
            data = base64.b64decode(event["data_base64"])
        elif "data" in event:
            data = json.dumps(event["data"]).encode()
        else:
            data = b""
        return "cloudevents-structured", event["type"], data, event.get("datacontenttype")
    if "ce_specversion" in headers:
        return "cloudevents-binary", headers["ce_type"], value, content_type or None
    return "raw-or-envelope", headers.get("X-Event-Type"), value, content_type or None


def main():
    p = argparse.ArgumentParser(description="outbox-relay Kafka consumer example")
    p.add_argument("--brokers", default="127.0.0.1:9092")
    p.add_argument("--topic", required=True, action="append", help="repeat for more topics")
    p.add_argument("--group", default="outbox-consumer-example")
    p.add_argument("--store", default=":memory:", help="SQLite file of processed event ids")
    p.add_argument("--count", type=int, help="stop after this many messages (tests)")
    p.add_argument("--timeout", type=float, help="fail when --count is not reached in time")
    args = p.parse_args()

    db = open_store(args.store)
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        # Committed by hand after the transaction: at least once, never at most once.
        "enable.auto.commit": False,
    })
    consumer.subscribe(args.topic)
    seen = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        while args.count is None or seen < args.count:
            if deadline and time.monotonic() > deadline:
                sys.exit(f"kafka_consumer.py: {seen} of {args.count} messages in {args.timeout} s")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            headers = {k: (v or b"").decode("utf-8", "replace") for k, v in msg.headers() or []}
            # X-Event-ID is on every message the relay sends, in every format.
            event_id = headers["X-Event-ID"]
            key = (msg.key() or b"").decode("utf-8", "replace")  # the aggregate id
            fmt, event_type, data, content_type = decode(headers, msg.value() or b"")
            trace_id, my_traceparent = child_traceparent(headers.get("traceparent"))
            with db:  # one transaction: the effect and the event id, or neither
                duplicate = db.execute(
                    "INSERT OR IGNORE INTO processed (event_id) VALUES (?)", (event_id,)
                ).rowcount == 0
                if not duplicate:
                    db.execute("INSERT INTO effects VALUES (?, ?, ?)",
                               (event_id, key, event_type))
            consumer.commit(message=msg, asynchronous=False)
            seen += 1
            print(json.dumps({
                "event_id": event_id,
                "aggregate_id": key,
                "type": event_type,
                "format": fmt,
                "content_type": content_type,
                "payload_base64": base64.b64encode(data).decode(),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "duplicate": duplicate,
                "trace_id": trace_id,
                "traceparent": my_traceparent,
            }), flush=True)
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
