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
