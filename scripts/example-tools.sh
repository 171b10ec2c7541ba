# The toolchains and drivers the writer examples (examples/) and their test (tests/examples.rs)
# need: psql, Python with psycopg 3, Node.js with the `pg` package, Go with a Postgres driver.
# Sourced by scripts/test.sh; `ensure_example_tools` installs only what is missing, so on a
# machine that has everything it costs a few checks.
#
# Go comes from Debian with lib/pq as a Debian package (golang-github-lib-pq-dev, installed
# under /usr/share/gocode) because the Go module proxy is out of reach here; the example is
# built in GOPATH mode against that tree (see examples/README.md).

EXAMPLES_GOPATH=/usr/share/gocode

_ex_have() { command -v "$1" >/dev/null 2>&1; }

_ex_as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_example_tools() {
  local root missing=()
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

  _ex_have psql || missing+=(postgresql-client)
  _ex_have go || missing+=(golang-go)
  [ -f "$EXAMPLES_GOPATH/src/github.com/lib/pq/conn.go" ] || missing+=(golang-github-lib-pq-dev)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing for the examples: ${missing[*]}"
    _ex_as_root apt-get update -qq
    _ex_as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi

  local py="${PYTHON:-python3}"
  if ! "$py" -c 'import psycopg' 2>/dev/null; then
    echo "== installing psycopg 3 for $py"
    "$py" -m pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.1,<4'
  fi

  _ex_have node || { echo "node is missing: the examples need Node.js 20 or later" >&2; return 1; }
  # npm ci follows the committed lock file exactly; the marker skips it when the lock file has
  # not changed since the last install.
  local node_dir="$root/examples/node"
  if ! cmp -s "$node_dir/package-lock.json" "$node_dir/node_modules/.package-lock.json.installed" 2>/dev/null; then
    echo "== npm ci in examples/node"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
    cp "$node_dir/package-lock.json" "$node_dir/node_modules/.package-lock.json.installed"
  fi
}
