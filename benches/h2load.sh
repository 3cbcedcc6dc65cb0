#!/usr/bin/env bash
# Server CPU per request under an independent load generator (h2load), as a ratio to
# the same server's GetStatus "floor" (gRPC stack + identity only), interleaved runs.
#
#   [RINGFENCE_BIN=path] [LEVELS="1 8 64"] benches/h2load.sh [RUNS] [REQUESTS] [extra serve flags...]
#
# Starts target/release/ringfence with development identity headers on loopback (the
# decision log fsynced in a temporary directory on disk), writes one gRPC-framed
# DecryptRecord body (alice via us-support-tool, a 20-field US profile: 16 fields
# decrypted, 4 denied) with the load generator, then alternates decrypt and floor runs
# at 1, 8 and 64 requests in flight. CPU per request is utime+stime from /proc/PID/stat
# before and after each run. Prints one line per run and the median ratio per level.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
REQUESTS=${2:-20000}
shift $(( $# > 2 ? 2 : $# )) || true
if ! command -v h2load >/dev/null; then
  echo "installing h2load (Debian nghttp2-client)" >&2
  (apt-get update -qq && apt-get install -y -qq nghttp2-client) >/dev/null
fi
cargo build --release --locked --quiet --bin ringfence --example loadgen
# RINGFENCE_BIN: another server binary to measure (e.g. an older build, to compare).
bin=${RINGFENCE_BIN:-target/release/ringfence}
case "$bin" in /*) ;; *) bin=$PWD/$bin ;; esac
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
"$bin" keys init --danger-allow-development-master-key --data-dir "$work/data" >/dev/null
RINGFENCE_LOG=warn,ringfence::server=info "$bin" serve --listen 127.0.0.1:0 \
  --danger-trust-identity-headers --danger-allow-development-master-key \
  --metrics-listen 127.0.0.1:0 --shutdown-drain-secs 0 --policies policies --data-dir "$work/data" "$@" 2>"$work/server.log" &
server=$!
for _ in $(seq 100); do
  addr=$(sed -n 's/.*address=\([0-9.:]*\).*/\1/p' "$work/server.log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/server.log"; exit 1; }
target/release/examples/loadgen --addr "$addr" --records 1 --write-bodies "$work" >/dev/null

hz=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$server/stat"; }  # clock ticks
h2() { # N PATH BODY CONNS STREAMS: h2load's output in $work/h2load.out
  h2load -n "$1" -c "$4" -m "$5" -d "$3" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    -H 'x-ringfence-service: us-support-tool' -H 'x-ringfence-employee: alice' \
    "http://$addr$2" > "$work/h2load.out"
  grep -q " 0 failed, 0 errored" "$work/h2load.out" || { cat "$work/h2load.out"; exit 1; }
}
data_bytes() { sed -n 's/^traffic:.*B (\([0-9]*\)) data.*/\1/p' "$work/h2load.out"; }
# h2load sees HTTP statuses, not gRPC ones (a gRPC error is a 200 with trailers and no
# body): one request's DATA bytes are measured first, and every run must carry that
# many per request, so a failing call can never pass as a cheap one.
declare -A per_request
run() { # PATH BODY CONNS STREAMS -> microseconds of server CPU per request, x1000
  local before after expected
  if [ -z "${per_request[$1]:-}" ]; then
    h2 1 "$1" "$2" 1 1
    per_request[$1]=$(data_bytes)
  fi
  before=$(cpu)
  h2 "$REQUESTS" "$1" "$2" "$3" "$4"
  after=$(cpu)
  expected=$(( per_request[$1] * REQUESTS ))
  [ "$(data_bytes)" = "$expected" ] || {
    echo "$1: $(data_bytes) bytes of answers, expected $expected: some calls failed" >&2; exit 1; }
  echo $(( (after - before) * 1000000000 / hz / REQUESTS ))
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# LEVELS: which in-flight levels to run (default all three), e.g. LEVELS=64.
for level in "1 1 1" "8 8 1" "64 16 4"; do
  case " ${LEVELS:-1 8 64} " in *" ${level%% *} "*) ;; *) continue ;; esac
  set -- $level
  : > "$work/ratios"
  for r in $(seq "$RUNS"); do
    d=$(run /ringfence.v1.Ringfence/DecryptRecord "$work/decrypt.bin" "$2" "$3")
    f=$(run /ringfence.v1.Ringfence/GetStatus "$work/status.bin" "$2" "$3")
    ratio=$(awk -v d="$d" -v f="$f" 'BEGIN {if (f > 0) printf "%.2f", d / f; else print "inf"}')
    echo "$ratio" >> "$work/ratios"
    printf 'in flight %-3s run %s: decrypt %6.1f us  floor %6.1f us  ratio %s\n' \
      "$1" "$r" "$(awk -v x="$d" 'BEGIN{print x/1000}')" "$(awk -v x="$f" 'BEGIN{print x/1000}')" "$ratio"
  done
  echo "in flight $1: median ratio $(median < "$work/ratios")"
done
