"""An independent Pulsar reader for the tests (tests/common/pulsar.rs): the official client
(pulsar-client, the C++ client's Python binding) subscribes to one topic with an exclusive
subscription from the earliest message and prints each stored message once, as one JSON line on stdout
(its topic or partition, partition key, properties, base64 body), acknowledging it. "ready" is printed once the
subscription exists. The client reconnects by itself when the broker restarts.

    python3 tests/pulsar_read.py <service url> <full topic name>
"""

import base64
import json
import sys
import uuid

import pulsar


def main() -> None:
    url, topic = sys.argv[1], sys.argv[2]
    client = pulsar.Client(
        url,
        logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error),
        operation_timeout_seconds=10,
    )
    consumer = client.subscribe(
        topic,
        f"s{uuid.uuid4().hex}",
        consumer_type=pulsar.ConsumerType.Exclusive,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    print("ready", flush=True)
    # The broker may deliver a stored message again (an acknowledgement it did not see in
    # time): the same message id (and event id), printed once, so what the tests count is what is stored.
    # A re-publish by the relay is another stored message, with an id of its own.
    seen = set()
    while True:
        try:
            msg = consumer.receive(timeout_millis=500)
        except pulsar.Timeout:
            continue
        # With the event id: non-persistent messages carry no real message id.
        mid = (str(msg.message_id()), msg.properties().get("X-Event-ID"))
        if mid in seen:
            consumer.acknowledge(msg)
            continue
        seen.add(mid)
        line = {
            "topic": msg.topic_name(),
            "key": msg.partition_key(),
            "properties": msg.properties(),
            "data": base64.b64encode(msg.data()).decode(),
        }
        print(json.dumps(line), flush=True)
        consumer.acknowledge(msg)


if __name__ == "__main__":
    main()
