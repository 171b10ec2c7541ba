# Starts the local services the relay's tests, demo and benchmarks use, when they are not
# running. Sourced by scripts/test.sh, scripts/quickstart.sh and scripts/bench.sh.

PG_HOST=127.0.0.1
PG_PORT=5432

have() { command -v "$1" >/dev/null 2>&1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

pg_up() {
  if have pg_isready; then
    pg_isready -h "$PG_HOST" -p "$PG_PORT" -q
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

ensure_postgres() {
  if pg_up; then return 0; fi
  echo "== starting Postgres on $PG_HOST:$PG_PORT"
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "   installing Debian's postgresql"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null
  fi
  local version
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  if ! have pg_lsclusters || ! pg_lsclusters -h | grep -q .; then
    as_root pg_createcluster "$version" main >/dev/null
  fi
  local conf="/etc/postgresql/$version/main"
  # Trust on loopback, as on the development machines: the tests connect as postgres, no password.
  if ! grep -q "outbox-relay trust" "$conf/pg_hba.conf" 2>/dev/null; then
    as_root sh -c "printf '%s\n' '# outbox-relay trust' 'host all all 127.0.0.1/32 trust' 'host all all ::1/128 trust' | cat - '$conf/pg_hba.conf' > '$conf/pg_hba.conf.new' && mv '$conf/pg_hba.conf.new' '$conf/pg_hba.conf'"
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || as_root pg_ctlcluster "$version" main start
  for _ in $(seq 1 60); do pg_up && return 0; sleep 0.5; done
  echo "Postgres did not come up on $PG_HOST:$PG_PORT" >&2
  return 1
}

NATS_HOST=127.0.0.1
NATS_PORT=4222
KAFKA_HOST=127.0.0.1
KAFKA_PORT=9092
TANSU_VERSION=0.6.0
# Built once per machine and kept outside the checkout, so a clean clone (CI) reuses it.
TOOLS_DIR="${OUTBOX_RELAY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}"
TANSU_BIN="$TOOLS_DIR/tansu-$TANSU_VERSION/bin/tansu"

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 120); do port_open "$1" "$2" && return 0; sleep 0.5; done
  echo "nothing listens on $1:$2" >&2
  return 1
}

ensure_nats() {
  if port_open "$NATS_HOST" "$NATS_PORT"; then return 0; fi
  echo "== starting nats-server (JetStream) on $NATS_HOST:$NATS_PORT"
  if ! [ -x /usr/sbin/nats-server ] && ! have nats-server; then
    echo "   installing Debian's nats-server"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  fi
  local bin
  bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  as_root mkdir -p /var/lib/nats-server
  as_root start-stop-daemon --start --oknodo --background --exec "$bin" -- \
    -a "$NATS_HOST" -p "$NATS_PORT" -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port "$NATS_HOST" "$NATS_PORT"
}

# The Kafka-protocol broker for the tests: tansu, built from crates.io the first time (about
# 15-20 minutes on 2 cores). The dynostore feature brings the in-memory storage engine the
# tests use. The build directory is kept, so an interrupted build resumes where it stopped.
ensure_tansu_binary() {
  if [ -x "$TANSU_BIN" ]; then return 0; fi
  echo "== building tansu $TANSU_VERSION into $TOOLS_DIR (once per machine)"
  mkdir -p "$TOOLS_DIR"
  CARGO_TARGET_DIR="$TOOLS_DIR/tansu-build" cargo install tansu --version "$TANSU_VERSION" \
    --locked --features dynostore --root "$TOOLS_DIR/tansu-$TANSU_VERSION" --quiet
}

ensure_kafka() {
  if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then return 0; fi
  ensure_tansu_binary
  echo "== starting tansu on $KAFKA_HOST:$KAFKA_PORT"
  mkdir -p "$TOOLS_DIR"
  nohup "$TANSU_BIN" broker \
    --listener-url "tcp://$KAFKA_HOST:$KAFKA_PORT" \
    --advertised-listener-url "tcp://$KAFKA_HOST:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$TOOLS_DIR/tansu.log" 2>&1 &
  wait_port "$KAFKA_HOST" "$KAFKA_PORT"
}

# The Pulsar-protocol broker for the tests: pulsar-lite, a native binary shipped in a PyPI
# wheel (no JVM), installed once per machine into the tools directory. It always serves
# metrics on 0.0.0.0:8080 unless its config turns them off, which ours does. Each start keeps
# its data (RocksDB) in a fresh directory.
PULSAR_HOST=127.0.0.1
PULSAR_PORT=6650
PULSAR_LITE_VERSION=0.2.0
PULSAR_LITE_DIR="$TOOLS_DIR/pulsar-lite-$PULSAR_LITE_VERSION"
PULSAR_LITE_BIN="$PULSAR_LITE_DIR/pulsar_lite/bin/pulsar-lite"

ensure_pulsar_binary() {
  if [ -x "$PULSAR_LITE_BIN" ]; then return 0; fi
  echo "== installing pulsar-lite $PULSAR_LITE_VERSION (PyPI) into $PULSAR_LITE_DIR (once per machine)"
  "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$PULSAR_LITE_DIR" "pulsar-lite==$PULSAR_LITE_VERSION"
  chmod +x "$PULSAR_LITE_BIN"
}

ensure_pulsar() {
  if port_open "$PULSAR_HOST" "$PULSAR_PORT"; then return 0; fi
  ensure_pulsar_binary
  echo "== starting pulsar-lite on $PULSAR_HOST:$PULSAR_PORT"
  mkdir -p "$TOOLS_DIR"
  printf '[metrics]\nenabled = false\n' >"$TOOLS_DIR/pulsar-lite.toml"
  local data
  data="$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-pulsar-XXXXXX")"
  nohup "$PULSAR_LITE_BIN" --config "$TOOLS_DIR/pulsar-lite.toml" \
    --addr "$PULSAR_HOST:$PULSAR_PORT" --db-path "$data/db" \
    >"$TOOLS_DIR/pulsar-lite.log" 2>&1 &
  wait_port "$PULSAR_HOST" "$PULSAR_PORT"
}

# The Pulsar client crate (pulsar-rs) compiles Pulsar's protocol definitions with protoc.
ensure_protoc() {
  if have protoc; then return 0; fi
  echo "== installing protoc (Debian's protobuf-compiler): building the Pulsar client needs it"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
}
