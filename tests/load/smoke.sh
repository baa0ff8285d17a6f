#!/usr/bin/env bash
# Load smoke test: start a chat-hub on SQLite in a temporary directory on a
# free loopback port (rate limit raised), run `chat-hub-load --quick` for the
# direct, group and backlog scenarios, stop the server. Fails on any loss,
# disorder, refused send or incomplete run. Builds nothing:
#   CHAT_HUB_BIN       (default target/debug/chat-hub)
#   CHAT_HUB_LOAD_BIN  (default target/debug/chat-hub-load)
# Every step is bounded in time; traffic goes to 127.0.0.1 only.
set -u
cd "$(dirname "$0")/../.."

BIN=${CHAT_HUB_BIN:-target/debug/chat-hub}
LOAD=${CHAT_HUB_LOAD_BIN:-target/debug/chat-hub-load}
SCENARIOS=${LOAD_SMOKE_SCENARIOS:-"direct group backlog"}

for b in "$BIN" "$LOAD"; do
  if [ ! -x "$b" ]; then
    echo "load smoke: $b not found or not executable (build it first: cargo build --bins)" >&2
    echo "load smoke: 0 passed, 1 failed"
    exit 1
  fi
done

tmp=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# A secret of our own, given to the server and the generator alike.
secret="load-smoke-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

# Port 0: the server picks a free port and logs it.
env -u DATABASE_URL -u CHAT_HUB_ALLOWED_ORIGINS \
  DATABASE_URL="$tmp/chat.db" \
  CHAT_HUB_BIND=127.0.0.1:0 \
  CHAT_HUB_JWT_SECRET="$secret" \
  CHAT_HUB_RATE_PER_SEC=1000000 \
  CHAT_HUB_RATE_BURST=1000000 \
  RUST_LOG=info \
  "$BIN" >"$tmp/server.log" 2>&1 &
server_pid=$!

port=""
for _ in $(seq 1 150); do
  port=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$tmp/server.log" | head -n1)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.2
done
if [ -z "$port" ]; then
  echo "load smoke: the server did not start; its log:" >&2
  tail -n 30 "$tmp/server.log" >&2
  echo "load smoke: 0 passed, 1 failed"
  exit 1
fi

healthy=""
for _ in $(seq 1 50); do
  if exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
    printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    status=$(timeout 2 head -n1 <&3 || true)
    exec 3<&- 3>&-
    case "$status" in *" 200"*) healthy=1; break ;; esac
  fi
  sleep 0.2
done
if [ -z "$healthy" ]; then
  echo "load smoke: /healthz never answered 200 on port $port" >&2
  tail -n 30 "$tmp/server.log" >&2
  echo "load smoke: 0 passed, 1 failed"
  exit 1
fi
echo "load smoke: chat-hub pid $server_pid on 127.0.0.1:$port ($tmp)"

passed=0
failed=0
for s in $SCENARIOS; do
  timeout 300 "$LOAD" --quick --url "ws://127.0.0.1:$port/ws" --secret "$secret" \
    --server-pid "$server_pid" --deadline 240 "$s" >"$tmp/$s.json" 2>"$tmp/$s.err"
  rc=$?
  summary=$(python3 - "$tmp/$s.json" 2>/dev/null <<'EOF'
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
keys = ["sent", "delivered", "lost", "duplicates", "out_of_order", "send_errors", "connect_to_synced_ms_median"]
print(" ".join(f"{k}={d[k]}" for k in keys if k in d))
EOF
)
  [ -n "$summary" ] || summary=$(tail -c 400 "$tmp/$s.json")
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    echo "PASS $s: $summary"
  else
    failed=$((failed + 1))
    echo "FAIL $s (exit $rc): $summary"
    cat "$tmp/$s.json"
    tail -n 20 "$tmp/$s.err"
  fi
done

kill -TERM "$server_pid" 2>/dev/null
for _ in $(seq 1 50); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.2
done
if kill -0 "$server_pid" 2>/dev/null; then
  echo "load smoke: the server did not stop within 10 s of SIGTERM" >&2
  failed=$((failed + 1))
fi
wait "$server_pid" 2>/dev/null
server_pid=""

echo "load smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
