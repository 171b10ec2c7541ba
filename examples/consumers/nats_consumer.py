#!/usr/bin/env python3
"""A minimal consumer of what outbox-relay publishes to NATS JetStream (nats-py).

It reads every route format the relay has (raw, envelope, CloudEvents binary and structured),
skips redeliveries by event id, continues the producer's trace, and prints one JSON line per
message. docs/CONSUMERS.md explains each step; tests/cloudevents.rs runs this file.

    pip install 'nats-py>=2.6,<3'
    python3 nats_consumer.py --url nats://127.0.0.1:4222 --stream ORDERS \
        --subject 'orders.>' --durable billing --store processed.sqlite

A durable pull consumer with explicit acks: a message is acknowledged after the consumer's
transaction commits, so a crash in between redelivers it, and the `processed` table (event
ids, written in the same SQLite transaction as the effect) recognises it. JetStream already
drops a re-publish of the same event id within the stream's duplicate window (`Nats-Msg-Id`);
the table covers what that cannot: redeliveries to this consumer, and re-publishes later than
the window.
"""

import argparse
import asyncio
import base64
import json
import os
import sqlite3
import sys
import time

try:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
except ImportError as e:
    sys.exit(f"nats_consumer.py: {e}; pip install 'nats-py>=2.6,<3' "
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


def decode(headers, data):
    """(format, event type, payload bytes, content type) of a message in any route format."""
    content_type = headers.get("content-type", "")
    if content_type.lower().startswith(STRUCTURED):
        event = json.loads(data)
        if "data_base64" in event:
            payload = base64.b64decode(event["data_base64"])
        elif "data" in event:
            payload = json.dumps(event["data"]).encode()
        else:
            payload = b""
        return "cloudevents-structured", event["type"], payload, event.get("datacontenttype")
    if "ce-specversion" in headers:
        # ce- values are percent-encoded (NATS binding); X-Event-Type is the same, plain.
        return "cloudevents-binary", headers.get("X-Event-Type"), data, content_type or None
    return "raw-or-envelope", headers.get("X-Event-Type"), data, content_type or None


async def run(args):
    db = open_store(args.store)
    nc = await nats.connect(args.url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            args.subject, durable=args.durable, stream=args.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
        )
        seen = 0
        deadline = time.monotonic() + args.timeout if args.timeout else None
        while args.count is None or seen < args.count:
            if deadline and time.monotonic() > deadline:
                sys.exit(f"nats_consumer.py: {seen} of {args.count} messages in {args.timeout} s")
            try:
                want = 64 if args.count is None else min(64, args.count - seen)
                batch = await sub.fetch(batch=want, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in batch:
                headers = dict(msg.headers or {})
                # X-Event-ID (and Nats-Msg-Id) is on every message the relay sends.
                event_id = headers["X-Event-ID"]
                fmt, event_type, payload, content_type = decode(headers, msg.data)
                trace_id, my_traceparent = child_traceparent(headers.get("traceparent"))
                with db:  # one transaction: the effect and the event id, or neither
                    duplicate = db.execute(
                        "INSERT OR IGNORE INTO processed (event_id) VALUES (?)", (event_id,)
                    ).rowcount == 0
                    if not duplicate:
                        db.execute("INSERT INTO effects VALUES (?, ?, ?)",
                                   (event_id, headers.get("X-Aggregate-ID"), event_type))
                await msg.ack()
                seen += 1
                print(json.dumps({
                    "event_id": event_id,
                    "aggregate_id": headers.get("X-Aggregate-ID"),
                    "type": event_type,
                    "format": fmt,
                    "content_type": content_type,
                    "payload_base64": base64.b64encode(payload).decode(),
                    "stream_sequence": msg.metadata.sequence.stream,
                    "redelivered": msg.metadata.num_delivered > 1,
                    "duplicate": duplicate,
                    "trace_id": trace_id,
                    "traceparent": my_traceparent,
                }), flush=True)
    finally:
        await nc.close()


def main():
    p = argparse.ArgumentParser(description="outbox-relay NATS JetStream consumer example")
    p.add_argument("--url", default="nats://127.0.0.1:4222")
    p.add_argument("--stream", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--durable", default="outbox-consumer-example")
    p.add_argument("--store", default=":memory:", help="SQLite file of processed event ids")
    p.add_argument("--count", type=int, help="stop after this many messages (tests)")
    p.add_argument("--timeout", type=float, help="fail when --count is not reached in time")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
