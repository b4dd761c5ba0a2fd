#!/usr/bin/env bash
# Run the Locust ranker scenarios headless against a running `userembed serve`, for a
# given time, and write CSV stats and an HTML report.
#
#   loadtests/run.sh [HOST] [DURATION] [CLIENTS] [OUT_DIR]
#   loadtests/run.sh http://127.0.0.1:8000 60s 32 var/loadtest
#
# gRPC target: LOADTEST_GRPC_TARGET (default 127.0.0.1:50051); other knobs in
# loadtests/locustfile.py. Exits non-zero when any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."

host="${1:-http://127.0.0.1:8000}"
duration="${2:-60s}"
clients="${3:-32}"
out="${4:-var/loadtest}"
locust="${LOCUST:-.venv/bin/locust}"

mkdir -p "$out"
"$locust" -f loadtests/locustfile.py --headless \
  --host "$host" --users "$clients" --spawn-rate "$clients" --run-time "$duration" \
  --stop-timeout 5 --only-summary --loglevel WARNING \
  --csv "$out/stats" --html "$out/report.html" --exit-code-on-error 1
echo "loadtest: CSV in $out/stats_*.csv, report in $out/report.html"
