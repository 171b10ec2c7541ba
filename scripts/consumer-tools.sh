# The Python packages the example consumers (examples/consumers/) and the CloudEvents tests
# (tests/cloudevents.rs, decoding with tests/cloudevents_decode.py) need: the CloudEvents SDK,
# a Kafka client, a NATS client and the official Pulsar client (also the independent reader of
# tests/pulsar.rs, tests/pulsar_read.py), all from PyPI. Source this file, then call
# `ensure_consumer_tools`: it imports each package first and runs pip only for those missing,
# so on a machine that has them it costs one Python start.
#
# PYTHON names the interpreter (default python3); the tests use the same variable.

CONSUMER_PY_PACKAGES=(
  "cloudevents>=2,<3"
  "confluent-kafka>=2.3,<3"
  "nats-py>=2.6,<3"
  "pulsar-client>=3.5,<4"
)

ensure_consumer_tools() {
  local py="${PYTHON:-python3}"
  command -v "$py" >/dev/null 2>&1 || {
    echo "ensure_consumer_tools: $py not found; the consumer examples need Python 3.10 or later" >&2
    return 1
  }
  # One import check per package (module names differ from the package names); what fails to
  # import is installed.
  local missing
  missing="$("$py" - "${CONSUMER_PY_PACKAGES[@]}" <<'PY'
import importlib, sys
modules = {"cloudevents": "cloudevents.core.bindings.kafka", "confluent-kafka": "confluent_kafka",
           "nats-py": "nats", "pulsar-client": "pulsar"}
for spec in sys.argv[1:]:
    name = spec.split(">")[0].split("<")[0].split("=")[0]
    try:
        importlib.import_module(modules[name])
    except ImportError:
        print(spec)
PY
)" || return 1
  if [ -n "$missing" ]; then
    local pkgs=()
    mapfile -t pkgs <<<"$missing"
    echo "== installing for the consumers: ${pkgs[*]}"
    "$py" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" || return 1
  fi
}
