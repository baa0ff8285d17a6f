#!/usr/bin/env bash
# One measurement of docs/PERFORMANCE.md: start a fresh chat-hub (new SQLite
# file or freshly created MariaDB database) on 127.0.0.1 with the rate limit
# raised and `ulimit -n` as high as allowed, wait for /healthz, run
# chat-hub-load with the given arguments (adding --url, --secret and
# --server-pid), stop the server, and append the JSON line, labelled, to $OUT.
#
#   tests/load/bench.sh sqlite|mysql LABEL [chat-hub-load args...]
#
# Environment:
#   CHAT_HUB_BIN       server binary (default /work/target-perf/release/chat-hub)
#   CHAT_HUB_LOAD_BIN  generator binary (default /work/target-perf/release/chat-hub-load)
#   OUT                results file (default /tmp/chat-hub-bench.jsonl)
#   MYSQL_URL          MariaDB server (default mysql://root@127.0.0.1:3306)
#   PERF_OUT           if set, `perf record -e cpu-clock -g` the server into this file
#   SERVER_ENV         extra VAR=value words for the server's environment
set -u
cd "$(dirname "$0")/../.."
backend=${1:?usage: bench.sh sqlite|mysql LABEL [chat-hub-load args...]}
label=${2:?label}
shift 2
BIN=${CHAT_HUB_BIN:-/work/target-perf/release/chat-hub}
LOAD=${CHAT_HUB_LOAD_BIN:-/work/target-perf/release/chat-hub-load}
OUT=${OUT:-/tmp/chat-hub-bench.jsonl}
MYSQL_URL=${MYSQL_URL:-mysql://root@127.0.0.1:3306}
PORT=${PORT:-18480}

tmp=$(mktemp -d)
secret="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
case "$backend" in
  sqlite) db_url="$tmp/chat.db" ;;
  mysql)
    db=chat_hub_bench
    mysql -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db" || exit 1
    db_url="$MYSQL_URL/$db"
    ;;
  *) echo "backend: sqlite or mysql" >&2; exit 2 ;;
esac

# The server gets the highest open-files limit this shell may set.
hard=$(ulimit -Hn)
(
  ulimit -n "$hard"
  exec env DATABASE_URL="$db_url" CHAT_HUB_BIND="127.0.0.1:$PORT" CHAT_HUB_JWT_SECRET="$secret" \
    CHAT_HUB_RATE_PER_SEC=1000000 CHAT_HUB_RATE_BURST=1000000 RUST_LOG=warn ${SERVER_ENV:-} "$BIN"
) >"$tmp/server.log" 2>&1 &
pid=$!
trap 'kill -KILL $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null || { tail "$tmp/server.log"; exit 1; }

perf_pid=""
if [ -n "${PERF_OUT:-}" ]; then
  perf record -e cpu-clock -F 499 ${PERF_ARGS:--g} -p "$pid" -o "$PERF_OUT" >/dev/null 2>&1 &
  perf_pid=$!
fi
ulimit -n "$hard"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
timeout 1800 "$LOAD" --url "ws://127.0.0.1:$PORT/ws" --secret "$secret" --server-pid "$pid" "$@" \
  >"$tmp/out.json" 2>"$tmp/err.log"
rc=$?
[ -n "$perf_pid" ] && kill -INT "$perf_pid" && wait "$perf_pid"
kill -TERM "$pid"
for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$tmp/out.json" "$label" "$backend" "$rc" "$*" "$load_before" "$load_after" >>"$OUT" <<'EOF'
import json, sys
path, label, backend, rc, args, lb, la = sys.argv[1:]
try:
    d = json.loads(open(path).read().strip().splitlines()[-1])
except Exception as e:
    d = {"error": f"no JSON: {e}"}
d = {"label": label, "backend": backend, "exit": int(rc), "args": args,
     "loadavg_before": lb, "loadavg_after": la, **d}
print(json.dumps(d))
EOF
tail -n 1 "$OUT" | cut -c1-600
# The server's warnings, without timestamps, most frequent first.
sed -E 's/^\[[^ ]+ /[/' "$tmp/server.log" | grep -iE "error|warn|panic" | cut -c1-200 | sort | uniq -c | sort -rn | head -5
exit "$rc"
