#!/usr/bin/env bash
# One cluster measurement: N chat-hub nodes (1 to 3) on 127.0.0.1, one fresh
# MariaDB database, one private redis-server (started here on a free port,
# stopped at the end), rate limits raised and `ulimit -n` as high as allowed;
# runs chat-hub-load with --url listing every node (so pairs and groups span
# the nodes) and --server-pid listing their pids, stops everything, and
# appends the JSON line, labelled, to $OUT.
#
#   tests/cluster/bench.sh NODES LABEL [chat-hub-load args...]
#   e.g. tests/cluster/bench.sh 3 direct-3 direct --pairs 50 --duration 20
#
# Environment:
#   CHAT_HUB_BIN       server binary, built with --features mysql
#                      (default /work/target-cluster/release/chat-hub)
#   CHAT_HUB_LOAD_BIN  generator (default /work/target-cluster/release/chat-hub-load)
#   OUT                results file (default /tmp/chat-hub-cluster-bench.jsonl)
#   MYSQL_URL          MariaDB server (default mysql://root@127.0.0.1:3306)
#   NO_REDIS=1         no Redis: standalone nodes (only meaningful with NODES=1)
#   SERVER_ENV         extra VAR=value words for every node's environment
#   KEEP_LOGS=DIR      copy the nodes', Redis's and the generator's logs there
set -u
cd "$(dirname "$0")/../.."
nodes=${1:?usage: bench.sh NODES LABEL [chat-hub-load args...]}
label=${2:?label}
shift 2
case $nodes in 1|2|3) ;; *) echo "NODES: 1, 2 or 3" >&2; exit 2 ;; esac
BIN=${CHAT_HUB_BIN:-/work/target-cluster/release/chat-hub}
LOAD=${CHAT_HUB_LOAD_BIN:-/work/target-cluster/release/chat-hub-load}
OUT=${OUT:-/tmp/chat-hub-cluster-bench.jsonl}
MYSQL_URL=${MYSQL_URL:-mysql://root@127.0.0.1:3306}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tmp=$(mktemp -d)
secret="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
run_id=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
db=chat_hub_cluster_bench
mysql -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db CHARACTER SET utf8mb4 COLLATE utf8mb4_bin" || exit 1

pids=()
redis_pid=""
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  if [ -n "${KEEP_LOGS:-}" ]; then
    mkdir -p "$KEEP_LOGS" && cp "$tmp"/*.log "$KEEP_LOGS"/ 2>/dev/null
  fi
  [ -z "$redis_pid" ] || kill -TERM "$redis_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

redis_env=()
if [ -z "${NO_REDIS:-}" ]; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --dir "$tmp" --logfile "$tmp/redis.log" </dev/null &
  redis_pid=$!
  disown
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
  [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] || { echo "redis-server did not start" >&2; exit 1; }
  redis_env=(CHAT_HUB_REDIS_URL="redis://127.0.0.1:$redis_port/" CHAT_HUB_REDIS_PREFIX="bench-$run_id")
fi

# Every node gets the highest open-files limit this shell may set.
hard=$(ulimit -Hn)
urls=()
for n in $(seq 1 "$nodes"); do
  port=$(free_port)
  (
    ulimit -n "$hard"
    exec env DATABASE_URL="$MYSQL_URL/$db" CHAT_HUB_BIND="127.0.0.1:$port" CHAT_HUB_JWT_SECRET="$secret" \
      CHAT_HUB_NODE_ID="bench-$n" "${redis_env[@]}" \
      CHAT_HUB_RATE_PER_SEC=1000000 CHAT_HUB_RATE_BURST=1000000 RUST_LOG=warn ${SERVER_ENV:-} "$BIN"
  ) >"$tmp/node$n.log" 2>&1 &
  pids+=($!)
  disown
  urls+=("ws://127.0.0.1:$port/ws")
  for _ in $(seq 1 150); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { tail "$tmp/node$n.log"; exit 1; }
done
# Cluster mode: wait until every node sees the others (bounded).
if [ -z "${NO_REDIS:-}" ] && [ "$nodes" -gt 1 ]; then
  for _ in $(seq 1 100); do
    formed=1
    for u in "${urls[@]}"; do
      m=${u#ws://}; m=${m%/ws}
      seen=$(curl -fs "http://$m/metrics" | sed -n 's/^chat_hub_cluster_nodes \([0-9.]*\).*/\1/p')
      [ "${seen%.*}" = "$((nodes - 1))" ] || formed=
    done
    [ -n "$formed" ] && break
    sleep 0.2
  done
  [ -n "$formed" ] || echo "warning: the nodes did not all see each other within 20 s" >&2
fi

ulimit -n "$hard"
url_list=$(IFS=,; echo "${urls[*]}")
pid_list=$(IFS=,; echo "${pids[*]}")
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
timeout 1800 "$LOAD" --url "$url_list" --secret "$secret" --server-pid "$pid_list" "$@" \
  >"$tmp/out.json" 2>"$tmp/err.log"
rc=$?
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
redis_cpu=""
if [ -n "$redis_pid" ]; then
  redis_cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$redis_pid/stat" 2>/dev/null)
fi
# The nodes' cluster counters (published, received, dropped, gap fills, ...).
for n in $(seq 1 "$nodes"); do
  u=${urls[$((n - 1))]#ws://}
  curl -fs --max-time 5 "http://${u%/ws}/metrics" | grep '^chat_hub_cluster_' >"$tmp/metrics$n.log"
done
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
for p in "${pids[@]}"; do
  for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
done
python3 - "$tmp/out.json" "$label" "$nodes" "$rc" "$*" "$load_before" "$load_after" \
  "${NO_REDIS:+none}" "$redis_cpu" "$tmp" >>"$OUT" <<'EOF'
import json, os, sys
path, label, nodes, rc, args, lb, la, redis, redis_cpu, tmp = sys.argv[1:]
try:
    d = json.loads(open(path).read().strip().splitlines()[-1])
except Exception as e:
    d = {"error": f"no JSON: {e}"}
cluster = {}
for n in range(1, int(nodes) + 1):
    f = os.path.join(tmp, f"metrics{n}.log")
    if os.path.exists(f):
        for line in open(f):
            name, _, value = line.strip().rpartition(" ")
            try:
                cluster.setdefault(f"node{n}", {})[name] = float(value)
            except ValueError:
                pass
d = {"label": label, "nodes": int(nodes), "redis": redis or "private", "backend": "mysql",
     "exit": int(rc), "args": args, "loadavg_before": lb, "loadavg_after": la,
     "redis_cpu_secs": float(redis_cpu) if redis_cpu else None, "cluster_metrics": cluster, **d}
print(json.dumps(d))
EOF
tail -n 1 "$OUT" | cut -c1-400
# The nodes' warnings, without timestamps, most frequent first.
cat "$tmp"/node*.log | sed -E 's/^\[[^ ]+ /[/' | grep -iE "error|warn|panic" | cut -c1-200 | sort | uniq -c | sort -rn | head -5
exit "$rc"
