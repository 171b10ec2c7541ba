#!/usr/bin/env bash
# The drain benchmark (see benches/drain.rs): BENCH_SIZES, BENCH_BATCH, BENCH_DEPTH adjust it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_protoc
cargo bench --bench drain
