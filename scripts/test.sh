#!/usr/bin/env bash
# The whole test suite, on a fresh machine or this one: starts or installs what the tests need
# when it is missing (Postgres, NATS with JetStream, the tansu Kafka broker built once per
# machine, the pulsar-lite Pulsar broker (PyPI), protoc, Prometheus, the writer examples' toolchains, the consumers' Python packages), then
# formatting, lints, the deployment artifacts' checks, and every test against the real
# services.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

ensure_postgres
ensure_nats
ensure_kafka
ensure_pulsar
ensure_protoc
source scripts/deploy-check.sh
ensure_prometheus
source scripts/example-tools.sh
ensure_example_tools
source scripts/consumer-tools.sh
ensure_consumer_tools

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings denied)"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo doc (broken links and private links denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked
echo "== deploy artifacts (scripts/deploy-check.sh)"
cargo build --locked --bin outbox-relay
bash scripts/deploy-check.sh
echo "== cargo test"
cargo test --all-targets --locked -- --test-threads="${TEST_THREADS:-4}" 2>&1 | tee target/test-output.log
# The tests' closing lines, summed into one line a CI reader can check.
awk '/^test result:/ { p += $4; f += $6 } END { printf "total: %d passed, %d failed\n", p, f; exit (f > 0) }' target/test-output.log
