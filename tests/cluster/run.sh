#!/usr/bin/env bash
# End-to-end test of chat-hub's cluster mode: three nodes on loopback ports,
# joined through a private Redis, sharing one fresh MariaDB database, with an
# nginx upstream of the three in front for the reconnect checks.
#
#   bash tests/cluster/run.sh             # uses target/debug/chat-hub
#   CHAT_HUB_BIN=/path/to/chat-hub bash tests/cluster/run.sh
#   KEEP_TMP=1 bash tests/cluster/run.sh  # keep the temp dir (logs, configs) and the database
#   E2E_ONLY=presence E2E_REPEAT=10 bash tests/cluster/run.sh
#                                         # only the checks named so, each ten times (flakes)
#
# The binary must be built with `--features mysql`. MariaDB must answer at
# $CHAT_HUB_TEST_MYSQL_URL (default mysql://root@127.0.0.1:3306, no password);
# the test creates its own database there and drops it at the end.
# Redis: a private redis-server on a free loopback port, started (and stopped
# and restarted by the test) here; the machine's Redis is not touched.
# Installs nginx-light, redis-server, curl and python3 with apt-get when
# missing (root needed then), and the Python `websockets` package into a venv
# in the temp dir. All traffic stays on 127.0.0.1. Ends with
# `cluster e2e: N passed, M failed` and exits non-zero on any failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
T0=$SECONDS
PASSED=0
FAILED=0

step() { echo "==> $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
die() { echo "ERROR: $*" >&2; echo "cluster e2e: $PASSED passed, $((FAILED + 1)) failed"; exit 1; }

BIN=${CHAT_HUB_BIN:-$ROOT/target/debug/chat-hub}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
[ -x "$BIN" ] || die "no chat-hub binary at $BIN: build it with \`cargo build --features mysql\` or set CHAT_HUB_BIN"

MYSQL_URL=${CHAT_HUB_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306}
MYSQL_URL=${MYSQL_URL%/}
# mysql://user[:password]@host[:port] -> the mysql client's options
mysql_rest=${MYSQL_URL#mysql://}
mysql_cred=${mysql_rest%@*}
mysql_hostport=${mysql_rest##*@}
[ "$mysql_cred" != "$mysql_rest" ] || die "CHAT_HUB_TEST_MYSQL_URL=$MYSQL_URL: expected mysql://user[:password]@host[:port]"
MYSQL_ARGS=(-h "${mysql_hostport%%:*}" -u "${mysql_cred%%:*}")
case $mysql_hostport in *:*) MYSQL_ARGS+=(-P "${mysql_hostport##*:}") ;; esac
case $mysql_cred in *:*) MYSQL_ARGS+=("-p${mysql_cred#*:}") ;; esac

# ---------------------------------------------------------------- packages
step "checking for nginx, redis-server, mysql client, curl, python3"
find_nginx() { command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
missing=()
[ -n "$(find_nginx)" ] || missing+=(nginx-light)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v mysql >/dev/null || missing+=(mariadb-client)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]} and not root: install them first"
    step "apt-get install ${missing[*]}"
    # Keep the packages' maintainer scripts from starting a system nginx or
    # Redis: policy-rc.d answering 101 forbids service starts.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    timeout 300 apt-get update -qq && timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || apt_ok=
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
    [ -n "$apt_ok" ] || die "apt-get install ${missing[*]} failed"
fi
NGINX=$(find_nginx)
[ -n "$NGINX" ] || die "nginx not found after installing"
REDIS_SERVER=$(command -v redis-server)
echo "    $("$NGINX" -v 2>&1), $("$REDIS_SERVER" --version | cut -d' ' -f1-3), $(python3 --version)"
timeout 10 mysql "${MYSQL_ARGS[@]}" -e 'SELECT 1' >/dev/null 2>&1 \
    || die "MariaDB does not answer at $MYSQL_URL (start it, or set CHAT_HUB_TEST_MYSQL_URL)"

# ---------------------------------------------------------------- temp dir, cleanup
TMP=$(mktemp -d /tmp/chat-hub-cluster.XXXXXX)
chmod 755 "$TMP"   # nginx's workers run unprivileged
mkdir -p "$TMP"/nginx/{logs,tmp} "$TMP"/redis
RUN_ID=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
DB=chat_hub_cluster_$RUN_ID
DB_MADE=
NGINX_PID=
stop_pidfile() { # pidfile: SIGTERM, up to 5 s, then SIGKILL
    local f=$1 p
    [ -f "$f" ] || return 0
    p=$(cat "$f" 2>/dev/null) || return 0
    [ -n "$p" ] || return 0
    if kill -TERM "$p" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    fi
    return 0
}
cleanup() {
    local rc=$?
    set +e
    for n in 1 2 3; do stop_pidfile "$TMP/node$n.pid"; done
    stop_pidfile "$TMP/redis.pid"
    if [ -n "$NGINX_PID" ]; then
        kill -QUIT "$NGINX_PID" 2>/dev/null && for _ in $(seq 50); do kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NGINX_PID" 2>/dev/null
    fi
    if [ "$rc" != 0 ] || [ "$FAILED" != 0 ]; then
        for f in "$TMP"/node1.log "$TMP"/node2.log "$TMP"/node3.log "$TMP/redis/redis.log" "$TMP/nginx/logs/error.log"; do
            [ -s "$f" ] && { echo "---- last lines of $f"; tail -n 25 "$f" | cut -c1-400; }
        done
    fi
    if [ -n "${KEEP_TMP:-}" ]; then
        echo "kept $TMP${DB_MADE:+ and database $DB}"
    else
        [ -z "$DB_MADE" ] || timeout 30 mysql "${MYSQL_ARGS[@]}" -e "DROP DATABASE IF EXISTS $DB"
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- ports, database
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(free_port); NGINX_PORT=$(free_port)
NODE_PORTS=("$(free_port)" "$(free_port)" "$(free_port)")
NODE_IDS=("node-a-$RUN_ID" "node-b-$RUN_ID" "node-c-$RUN_ID")
echo "    ports: redis $REDIS_PORT, nodes ${NODE_PORTS[*]}, nginx $NGINX_PORT"

step "fresh MariaDB database $DB"
timeout 30 mysql "${MYSQL_ARGS[@]}" -e "CREATE DATABASE $DB CHARACTER SET utf8mb4 COLLATE utf8mb4_bin" \
    || die "CREATE DATABASE $DB failed"
DB_MADE=1

# ---------------------------------------------------------------- launchers
# One script per process, used by this script and by e2e.py (which kills and
# restarts nodes and Redis): each writes its pid (the exec'd process keeps it)
# and appends to its log.
cat >"$TMP/redis.sh" <<EOF
#!/usr/bin/env bash
echo \$\$ >"$TMP/redis.pid"
exec "$REDIS_SERVER" --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no --daemonize no \\
    --dir "$TMP/redis" --logfile "$TMP/redis/redis.log" </dev/null
EOF
SECRET="cluster-e2e-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
API_KEY="cluster-api-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
for n in 1 2 3; do
    i=$((n - 1))
    cat >"$TMP/node$n.sh" <<EOF
#!/usr/bin/env bash
echo \$\$ >"$TMP/node$n.pid"
exec env -u CHAT_HUB_ALLOWED_ORIGINS \\
    DATABASE_URL="$MYSQL_URL/$DB" \\
    CHAT_HUB_BIND=127.0.0.1:${NODE_PORTS[$i]} \\
    CHAT_HUB_NODE_ID=${NODE_IDS[$i]} \\
    CHAT_HUB_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/ \\
    CHAT_HUB_REDIS_PREFIX=chat-hub-e2e-$RUN_ID \\
    CHAT_HUB_JWT_SECRET=$SECRET \\
    CHAT_HUB_API_KEY=$API_KEY \\
    CHAT_HUB_DEV_LOGIN=1 \\
    CHAT_HUB_TRUSTED_PROXIES=127.0.0.1 \\
    CHAT_HUB_RATE_PER_SEC=1000 CHAT_HUB_RATE_BURST=1000 \\
    RUST_LOG=info \\
    "$BIN" >>"$TMP/node$n.log" 2>&1 </dev/null
EOF
done

# ---------------------------------------------------------------- Redis
step "private redis-server on 127.0.0.1:$REDIS_PORT"
bash "$TMP/redis.sh" &
disown   # e2e.py may kill it: no job report from this shell
ok=
for _ in $(seq 100); do
    if [ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; then ok=1; break; fi
    sleep 0.1
done
[ -n "$ok" ] || die "redis-server did not answer PING within 10 s"

# ---------------------------------------------------------------- nodes
step "starting three chat-hub nodes ($BIN)"
for n in 1 2 3; do bash "$TMP/node$n.sh" & disown; done
for n in 1 2 3; do
    ok=
    for _ in $(seq 300); do
        if curl -fsS --max-time 2 "http://127.0.0.1:${NODE_PORTS[$((n - 1))]}/readyz" >/dev/null 2>&1; then ok=1; break; fi
        p=$(cat "$TMP/node$n.pid" 2>/dev/null || true)
        if [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null; then break; fi
        sleep 0.1
    done
    [ -n "$ok" ] || { tail -n 20 "$TMP/node$n.log" >&2; die "node $n not ready within 30 s (is $BIN built with --features mysql?)"; }
done
echo "    three nodes ready after $((SECONDS - T0)) s"

# ---------------------------------------------------------------- nginx
step "nginx with an upstream of the three nodes on 127.0.0.1:$NGINX_PORT"
USER_LINE=
if [ "$(id -u)" = 0 ]; then
    if id www-data >/dev/null 2>&1; then USER_LINE="user www-data;"; else USER_LINE="user nobody nogroup;"; fi
fi
# The /ws location is deploy/nginx/chat-hub.conf's (upgrade headers, no
# buffering); the upstream lists the three nodes, and a connection refused by
# a dead node is passed to the next one (proxy_next_upstream's default).
cat >"$TMP/nginx/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log notice;
events { worker_connections 1024; }
http {
    access_log $TMP/nginx/logs/access.log;
    client_body_temp_path $TMP/nginx/tmp/body;
    proxy_temp_path $TMP/nginx/tmp/proxy;
    fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
    scgi_temp_path $TMP/nginx/tmp/scgi;

    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      close;
    }
    upstream chat_hub_cluster {
        server 127.0.0.1:${NODE_PORTS[0]} max_fails=1 fail_timeout=5s;
        server 127.0.0.1:${NODE_PORTS[1]} max_fails=1 fail_timeout=5s;
        server 127.0.0.1:${NODE_PORTS[2]} max_fails=1 fail_timeout=5s;
        keepalive 8;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        proxy_http_version 1.1;
        proxy_set_header Host              \$host;
        proxy_set_header X-Real-IP         \$remote_addr;
        proxy_set_header X-Forwarded-For   \$proxy_add_x_forwarded_for;
        proxy_set_header Connection        "";
        proxy_connect_timeout 2s;
        proxy_next_upstream error timeout;

        location = /ws {
            proxy_pass http://chat_hub_cluster;
            proxy_http_version 1.1;
            proxy_set_header Upgrade           \$http_upgrade;
            proxy_set_header Connection        \$connection_upgrade;
            proxy_set_header Host              \$host;
            proxy_set_header X-Real-IP         \$remote_addr;
            proxy_set_header X-Forwarded-For   \$proxy_add_x_forwarded_for;
            proxy_read_timeout 30s;
            proxy_send_timeout 30s;
            proxy_buffering off;
        }
        location / {
            proxy_pass http://chat_hub_cluster;
        }
    }
}
EOF
NGX=("$NGINX" -p "$TMP/nginx" -e "$TMP/nginx/logs/error.log" -c "$TMP/nginx/nginx.conf")
if out=$(timeout 30 "${NGX[@]}" -t 2>&1); then
    pass "nginx -t accepts the cluster config"
else
    echo "$out"; fail "nginx -t"; die "nginx rejected the config"
fi
"${NGX[@]}" -g 'daemon off;' &
NGINX_PID=$!
ok=
for _ in $(seq 100); do
    if curl -fsS --max-time 2 "http://127.0.0.1:$NGINX_PORT/healthz" >/dev/null 2>&1; then ok=1; break; fi
    kill -0 "$NGINX_PID" 2>/dev/null || die "nginx exited"
    sleep 0.1
done
[ -n "$ok" ] || die "no /healthz through nginx within 10 s"

# ---------------------------------------------------------------- e2e client
step "python venv with websockets"
python3 -m venv "$TMP/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
timeout 300 "$TMP/venv/bin/pip" install -q --disable-pip-version-check 'websockets>=13,<18' \
    || die "pip install websockets failed"
echo "    websockets $("$TMP/venv/bin/python" -c 'import websockets; print(websockets.__version__)')"

step "running tests/cluster/e2e.py"
e2e_rc=0
E2E_TMP=$TMP E2E_NODE_PORTS=$(IFS=,; echo "${NODE_PORTS[*]}") E2E_NODE_IDS=$(IFS=,; echo "${NODE_IDS[*]}") \
E2E_NGINX_PORT=$NGINX_PORT E2E_REDIS_PORT=$REDIS_PORT E2E_API_KEY=$API_KEY E2E_RUN=$RUN_ID \
    timeout 600 "$TMP/venv/bin/python" -u "$ROOT/tests/cluster/e2e.py" || e2e_rc=$?
if [ -f "$TMP/e2e.counts" ]; then
    read -r p f <"$TMP/e2e.counts"
    PASSED=$((PASSED + p)); FAILED=$((FAILED + f))
fi
if [ "$e2e_rc" != 0 ] && [ "$FAILED" = 0 ]; then fail "e2e.py exited $e2e_rc"; fi
kill -0 "$NGINX_PID" 2>/dev/null || fail "nginx died during the test"

echo "took $((SECONDS - T0)) s"
echo "cluster e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
