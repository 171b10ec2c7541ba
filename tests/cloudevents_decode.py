#!/usr/bin/env python3
"""Reads the messages the relay published on a Kafka topic or a JetStream stream and decodes
each with the CloudEvents Python SDK (the `cloudevents` package on PyPI, independent of the
relay), as tests/cloudevents.rs asks: one JSON line per message on stdout.

Kafka messages go through the SDK's Kafka binding (`from_kafka`: `ce_*` headers mean binary
mode, anything else structured). NATS messages go through its HTTP binding (`from_http`):
the NATS binding's binary mode uses the same `ce-` prefix and percent-encoding as HTTP's, and
the SDK has no NATS binding of its own.

Each line: {"mode", "id", "source", "type", "subject", "time" (ISO 8601), "datacontenttype",
"extensions": {...}, "data": {"json": value} | {"text": str} | {"bytes": base64} | null,
"headers": {...}}. Exits non-zero, saying why, when a package is not installed (naming the
install) or when fewer than --count messages arrive within --timeout seconds.
"""

import argparse
import asyncio
import base64
import json
import sys
import time
import uuid

INSTALL = (
    "install the consumer tools: source scripts/consumer-tools.sh && ensure_consumer_tools "
    "(pip install 'cloudevents>=2,<3' 'confluent-kafka>=2.3,<3' 'nats-py>=2.6,<3')"
)

try:
    from cloudevents.core.bindings import http as ce_http
    from cloudevents.core.bindings import kafka as ce_kafka
    from cloudevents.core.formats.json import JSONFormat
except ImportError as e:
    sys.exit(f"cloudevents_decode.py: the cloudevents package is missing ({e}); {INSTALL}")

STANDARD = {"id", "source", "type", "subject", "time", "datacontenttype", "specversion",
            "dataschema"}


def describe(event, mode, headers):
    attrs = event.get_attributes()
    data = event.get_data()
    if data is None:
        shown = None
    elif isinstance(data, (bytes, bytearray)):
        shown = {"bytes": base64.b64encode(bytes(data)).decode()}
    elif isinstance(data, str):
        shown = {"text": data}
    else:
        shown = {"json": data}
    time_attr = event.get_time()
    return {
        "mode": mode,
        "specversion": event.get_specversion(),
        "id": event.get_id(),
        "source": event.get_source(),
        "type": event.get_type(),
        "subject": event.get_subject(),
        "time": time_attr.isoformat() if time_attr is not None else None,
        "datacontenttype": event.get_datacontenttype(),
        "extensions": {k: v for k, v in attrs.items() if k not in STANDARD},
        "data": shown,
        "headers": headers,
    }


def read_kafka(args):
    try:
        from confluent_kafka import Consumer
    except ImportError as e:
        sys.exit(f"cloudevents_decode.py: the confluent-kafka package is missing ({e}); {INSTALL}")
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"ce-decode-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 50,
    })
    consumer.subscribe([args.topic])
    out = []
    deadline = time.monotonic() + args.timeout
    try:
        while len(out) < args.count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            raw = {k: (v or b"") for k, v in (msg.headers() or [])}
            message = ce_kafka.KafkaMessage(headers=raw, key=msg.key(), value=msg.value() or b"")
            mode = "binary" if any(k.lower().startswith("ce_") for k in raw) else "structured"
            event = ce_kafka.from_kafka(message, JSONFormat())
            headers = {k: v.decode("utf-8", "replace") for k, v in raw.items()}
            out.append(describe(event, mode, headers))
    finally:
        consumer.close()
    return out


async def read_nats(args):
    try:
        import nats
    except ImportError as e:
        sys.exit(f"cloudevents_decode.py: the nats-py package is missing ({e}); {INSTALL}")
    nc = await nats.connect(args.url)
    out = []
    try:
        js = nc.jetstream()
        sub = await js.subscribe(args.subject, stream=args.stream, ordered_consumer=True)
        deadline = time.monotonic() + args.timeout
        while len(out) < args.count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=min(left, 1.0))
            except nats.errors.TimeoutError:
                continue
            headers = dict(msg.headers or {})
            mode = "binary" if any(k.lower().startswith("ce-") for k in headers) else "structured"
            event = ce_http.from_http(ce_http.HTTPMessage(headers=headers, body=msg.data),
                                      JSONFormat())
            out.append(describe(event, mode, headers))
    finally:
        await nc.close()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("broker", choices=["kafka", "nats"])
    p.add_argument("--brokers", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    p.add_argument("--topic", help="Kafka topic")
    p.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server")
    p.add_argument("--stream", help="JetStream stream")
    p.add_argument("--subject", default=">", help="JetStream subject filter")
    p.add_argument("--count", type=int, required=True, help="messages to read")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for them")
    args = p.parse_args()
    got = read_kafka(args) if args.broker == "kafka" else asyncio.run(read_nats(args))
    for line in got:
        print(json.dumps(line, sort_keys=True))
    if len(got) < args.count:
        sys.exit(f"cloudevents_decode.py: {len(got)} of {args.count} messages within "
                 f"{args.timeout} s")


if __name__ == "__main__":
    main()
