#!/usr/bin/env bash
# The performance benchmark: server CPU per request under load from outside, as a
# ratio to the same server's GetStatus "floor" (gRPC stack + identity, nothing else),
# the median of interleaved runs. Prints one table; the README's is its output.
#
#   [RINGFENCE_BIN=path] [LEVELS="1 8 64"] [COLD=0] benches/load.sh [RUNS] [REQUESTS] [extra serve flags...]
#
# Warm: h2load (Debian's nghttp2-client, installed when missing) replays one
# gRPC-framed request against `target/release/ringfence serve` on loopback with
# development identity headers, the decision log fsynced in a temporary directory on
# disk. The bodies are made through the public API by the load generator
# (examples/loadgen.rs --write-bodies): alice's DecryptRecord of a 20-field US profile
# via us-support-tool (16 fields decrypted, 4 denied), us-signup's EncryptRecord of
# that profile, a DecryptRecords stream of 256 such records, and GetStatus. Runs
# alternate decrypt, encrypt and floor (RUNS times, REQUESTS requests each) at 1, 8
# and 64 requests in flight (64 = 16 connections x 4 streams); the stream runs 2
# connections of one stream each, 32 records in flight per stream (the server's
# per-stream window), so 64 records in flight, against the floor at 64.
#
# Cold (COLD=0 skips it): h2load replays one body, so the project's load generator
# drives it, as many clients as requests in flight, against a server of its own:
# every decrypt opens another data subject's record (encrypted at setup) with a new
# ticket, its subject secret read from the subject store (the server's subject cache
# is off), every encrypt is a new subject's record; its
# floor is GetStatus from the same generator. It measures target/release/ringfence
# (not RINGFENCE_BIN). CPU per request is utime+stime from /proc/PID/stat before and after
# each run; the log bytes are the decision log's own lines.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
REQUESTS=${2:-20000}
shift $(( $# > 2 ? 2 : $# )) || true
COLD=${COLD:-1}
if ! command -v h2load >/dev/null; then
  echo "installing h2load (Debian nghttp2-client)" >&2
  (apt-get update -qq && apt-get install -y -qq nghttp2-client) >/dev/null
fi
cargo build --release --locked --quiet --bin ringfence --example loadgen
# RINGFENCE_BIN: another server binary to measure (e.g. an older build, to compare).
bin=${RINGFENCE_BIN:-target/release/ringfence}
case "$bin" in /*) ;; *) bin=$PWD/$bin ;; esac
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
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
declare -A service=([decrypt]=us-support-tool [stream]=us-support-tool [status]=us-support-tool [encrypt]=us-signup)
declare -A path=([decrypt]=DecryptRecord [stream]=DecryptRecords [status]=GetStatus [encrypt]=EncryptRecord)
h2() { # CALL N CONNS STREAMS: h2load's output in $work/h2load.out, latencies in $work/h2load.log
  local employee=()
  [ "$1" = encrypt ] || employee=(-H 'x-ringfence-employee: alice')
  : > "$work/h2load.log"  # h2load appends to it
  h2load -n "$2" -c "$3" -m "$4" -d "$work/$1.bin" --log-file "$work/h2load.log" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    -H "x-ringfence-service: ${service[$1]}" "${employee[@]}" \
    "http://$addr/ringfence.v1.Ringfence/${path[$1]}" > "$work/h2load.out"
  grep -q " 0 failed, 0 errored" "$work/h2load.out" || { cat "$work/h2load.out" >&2; exit 1; }
}
data_bytes() { sed -n 's/^traffic:.*B (\([0-9]*\)) data.*/\1/p' "$work/h2load.out"; }
# h2load sees HTTP statuses, not gRPC ones (a gRPC error is a 200 with trailers and no
# body): one request's DATA bytes are measured first, and every run must carry that
# many per request (give or take the varying bytes of an encryption's output), so a
# failing call can never pass as a cheap one.
declare -A per_request
for call in decrypt encrypt status stream; do
  h2 "$call" 1 1 1
  per_request[$call]=$(data_bytes)
done
# CALL CONNS STREAMS RECORDS_PER_REQUEST -> "nanoseconds of server CPU per record, records/s, p50 us"
run() {
  local before after got expected started ended requests=$REQUESTS
  [ "$1" = stream ] && requests=$(( REQUESTS / $4 > 4 ? REQUESTS / $4 : 4 ))
  before=$(cpu)
  started=$(date +%s%N)
  h2 "$1" "$requests" "$2" "$3"
  ended=$(date +%s%N)
  after=$(cpu)
  got=$(data_bytes)
  expected=$(( per_request[$1] * requests ))
  # Encryptions vary by a few bytes (protobuf varints); decryptions must match exactly.
  if [ "$1" = encrypt ]; then
    [ $(( got * 100 / expected )) -ge 99 ] || { echo "$1: $got bytes of answers, expected about $expected: some calls failed" >&2; exit 1; }
  else
    [ "$got" = "$expected" ] || { echo "$1: $got bytes of answers, expected $expected: some calls failed" >&2; exit 1; }
  fi
  local records=$(( requests * $4 ))
  echo "$(( (after - before) * 1000000000 / hz / records )) $(( records * 1000000000 / (ended - started) )) $(sort -n -k3 "$work/h2load.log" | awk '{a[NR]=$3} END {print a[int((NR+1)/2)]}')"
}
us() { awk -v x="$1" 'BEGIN{printf "%.1f", x/1000}'; }
ratio() { awk -v d="$1" -v f="$2" 'BEGIN {if (f > 0) printf "%.2f", d / f; else print "inf"}'; }
results=$work/results  # CALL LEVEL TEMPERATURE ns_per_record records_per_s p50_us floor_ns ratio
: > "$results"
record() { echo "$*" >> "$results"; }

echo "# warm: h2load, $RUNS interleaved runs of $REQUESTS requests" >&2
for level in "1 1 1" "8 8 1" "64 16 4"; do
  case " ${LEVELS:-1 8 64} " in *" ${level%% *} "*) ;; *) continue ;; esac
  set -- $level
  for r in $(seq "$RUNS"); do
    # Assigned first, so that a failed run stops the script (`read <<<` would not).
    out=$(run decrypt "$2" "$3" 1); read -r d drate dp50 <<< "$out"
    out=$(run encrypt "$2" "$3" 1); read -r e erate ep50 <<< "$out"
    out=$(run status "$2" "$3" 1); read -r f frate fp50 <<< "$out"
    record decrypt "$1" warm "$d" "$drate" "$dp50" "$f" "$(ratio "$d" "$f")"
    record encrypt "$1" warm "$e" "$erate" "$ep50" "$f" "$(ratio "$e" "$f")"
    printf 'in flight %-3s run %s: decrypt %6s us  encrypt %6s us  floor %6s us  ratios %s %s\n' \
      "$1" "$r" "$(us "$d")" "$(us "$e")" "$(us "$f")" "$(ratio "$d" "$f")" "$(ratio "$e" "$f")" >&2
    if [ "$1" = 64 ]; then
      out=$(run stream 2 1 256); read -r s srate sp50 <<< "$out"
      record stream 64 warm "$s" "$srate" - "$f" "$(ratio "$s" "$f")"
      printf 'in flight 64  run %s: DecryptRecords %6s us per record  ratio %s\n' "$r" "$(us "$s")" "$(ratio "$s" "$f")" >&2
    fi
  done
done
# Decision log bytes per entry, by kind, from the warm server's own log.
log_bytes=$(cat "$work"/data/log/decisions-*.jsonl | awk '
  match($0, /"kind":"[a-z_]*"/) { kind = substr($0, RSTART + 8, RLENGTH - 9); n[kind]++; b[kind] += length($0) + 1 }
  END { for (k in n) if (k == "decrypt" || k == "encrypt") printf "%s %d %d\n", k, n[k], b[k] / n[k] }' | sort)
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; server=

if [ "$COLD" != 0 ]; then
  echo "# cold: examples/loadgen, $RUNS interleaved runs of 3 s" >&2
  loadgen() { # CLIENTS ARGS... -> "ns per request, records/s, p50 us"
    local clients=$1; shift
    rm -rf "$work/cold"  # a server of its own, its log on the same disk as the warm runs'
    target/release/examples/loadgen --clients "$clients" --seconds 3 --data-dir "$work/cold" "$@" \
      > "$work/loadgen.out" 2> "$work/loadgen.err" || { cat "$work/loadgen.err" >&2; exit 1; }
    awk '
      /^requests answered:/ { gsub(/[(]/, "", $4); rate = $4 }
      /^latency per request:/ { p50 = $5 }
      /^server CPU:/ { ns = $6 * 1000 }
      /before the time was up/ { short = 1 }
      END { if (short) print "loadgen: records exhausted, pass more" > "/dev/stderr"; printf "%d %d %d\n", ns, rate, p50 }' "$work/loadgen.out"
  }
  for level in 1 8 64; do
    case " ${LEVELS:-1 8 64} " in *" $level "*) ;; *) continue ;; esac
    records=$(( level == 1 ? 6000 : 30000 ))
    for r in $(seq "$RUNS"); do
      out=$(loadgen "$level" --call decrypt --cold --records "$records"); read -r d drate dp50 <<< "$out"
      out=$(loadgen "$level" --call encrypt --cold --records 1); read -r e erate ep50 <<< "$out"
      out=$(loadgen "$level" --call status --records 1); read -r f frate fp50 <<< "$out"
      record decrypt "$level" cold "$d" "$drate" "$dp50" "$f" "$(ratio "$d" "$f")"
      record encrypt "$level" cold "$e" "$erate" "$ep50" "$f" "$(ratio "$e" "$f")"
      printf 'in flight %-3s run %s: cold decrypt %6s us  cold encrypt %6s us  floor %6s us  ratios %s %s\n' \
        "$level" "$r" "$(us "$d")" "$(us "$e")" "$(us "$f")" "$(ratio "$d" "$f")" "$(ratio "$e" "$f")" >&2
    done
  done
fi

# The table: per call, level and temperature, the run with the median ratio.
echo
echo "| call | in flight | warm/cold | records/s | server CPU per record | floor | ratio | p50 latency |"
echo "|---|---|---|---|---|---|---|---|"
awk '{print $1, $2, $3}' "$results" | awk '!seen[$0]++' | while read -r call level temperature; do
  awk -v c="$call" -v l="$level" -v t="$temperature" '$1 == c && $2 == l && $3 == t' "$results" \
    | sort -n -k8 | awk '{a[NR] = $0} END {print a[int((NR + 1) / 2)]}' \
    | while read -r _ _ _ ns rate p50 floor ratio; do
      name=$call; [ "$call" = stream ] && name="decrypt (DecryptRecords)"
      [ "$p50" = - ] && p50="" || p50="$p50 us"
      echo "| $name | $level | $temperature | $rate | $(us "$ns") us | $(us "$floor") us | $ratio | $p50 |"
    done
done
echo
echo "Decision log per entry (bytes, mean of the warm run's entries):"
echo "$log_bytes" | while read -r kind n bytes; do
  if [ -n "$kind" ]; then echo "- $kind: $bytes bytes ($n entries)"; fi
done
