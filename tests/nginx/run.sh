#!/usr/bin/env bash
# End-to-end test of chat-hub behind nginx, with nginx configured from
# deploy/nginx/chat-hub.conf itself (only ports, certificate paths, log paths
# and the WebSocket timeouts rewritten), plus `systemd-analyze verify` of
# deploy/systemd/chat-hub.service.
#
#   bash tests/nginx/run.sh            # uses target/debug/chat-hub
#   CHAT_HUB_BIN=/path/to/chat-hub bash tests/nginx/run.sh
#   KEEP_TMP=1 bash tests/nginx/run.sh # keep the temp dir (logs, configs)
#
# Installs nginx-light, openssl and curl with apt-get when missing (root
# needed then), and the Python `websockets` package into a venv in the temp
# dir. All traffic stays on 127.0.0.1. Ends with `nginx e2e: N passed, M failed`
# and exits non-zero on any failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
T0=$SECONDS
PASSED=0
FAILED=0

step() { echo "==> $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
die() { echo "ERROR: $*" >&2; exit 1; }

BIN=${CHAT_HUB_BIN:-$ROOT/target/debug/chat-hub}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
[ -x "$BIN" ] || die "no chat-hub binary at $BIN: build it with \`cargo build\` or set CHAT_HUB_BIN"

# ---------------------------------------------------------------- packages
step "checking for nginx, openssl, curl, python3"
find_nginx() { command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
missing=()
[ -n "$(find_nginx)" ] || missing+=(nginx-light)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]} and not root: install them first"
    step "apt-get install ${missing[*]}"
    # Keep the package's maintainer scripts from starting a system nginx on
    # port 80: policy-rc.d answering 101 forbids service starts.
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
echo "    $("$NGINX" -v 2>&1), $(openssl version), $(python3 --version)"

# ---------------------------------------------------------------- temp dir, cleanup
TMP=$(mktemp -d /tmp/chat-hub-nginx.XXXXXX)
# nginx's workers run as an unprivileged user: they must be able to traverse
# the temp dir (the key stays 0600, read by the master only).
chmod 755 "$TMP"
mkdir -p "$TMP"/nginx/{logs,tmp,acme} "$TMP"/hub "$TMP"/tls
NGINX_PID=
cleanup() {
    local rc=$?
    set +e
    if [ -f "$TMP/hub.pid" ]; then
        local p
        p=$(cat "$TMP/hub.pid")
        kill -TERM "$p" 2>/dev/null && for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    fi
    if [ -n "$NGINX_PID" ]; then
        kill -QUIT "$NGINX_PID" 2>/dev/null && for _ in $(seq 50); do kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NGINX_PID" 2>/dev/null
    fi
    if [ "$rc" != 0 ] || [ "$FAILED" != 0 ]; then
        for f in "$TMP/chat-hub.log" "$TMP/nginx/logs/error.log" "$TMP/nginx/logs/chat-hub.error.log"; do
            [ -s "$f" ] && { echo "---- last lines of $f"; tail -n 30 "$f"; }
        done
    fi
    if [ -n "${KEEP_TMP:-}" ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- systemd unit
step "systemd-analyze verify deploy/systemd/chat-hub.service"
if command -v systemd-analyze >/dev/null; then
    # The unit's ExecStart= points at /usr/local/bin/chat-hub; verify a copy
    # pointing at the binary under test instead.
    mkdir -p "$TMP/systemd"
    sed "s#^ExecStart=/usr/local/bin/chat-hub#ExecStart=$BIN#" \
        "$ROOT/deploy/systemd/chat-hub.service" >"$TMP/systemd/chat-hub.service"
    if out=$(timeout 60 systemd-analyze verify "$TMP/systemd/chat-hub.service" 2>&1) && [ -z "$out" ]; then
        pass "systemd-analyze verify: no complaints"
    else
        echo "$out"
        fail "systemd-analyze verify"
    fi
else
    echo "    skipped: systemd-analyze is not installed (Debian package \`systemd\`)"
fi

# ---------------------------------------------------------------- ports, certificate
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HUB_PORT=$(free_port); HTTP_PORT=$(free_port); HTTPS_PORT=$(free_port); REDIR_PORT=$(free_port)
echo "    ports: chat-hub $HUB_PORT, nginx http $HTTP_PORT, https $HTTPS_PORT, redirect $REDIR_PORT"

step "self-signed certificate for 127.0.0.1"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" 2>/dev/null
chmod 600 "$TMP/tls/key.pem"

# ---------------------------------------------------------------- nginx
step "nginx config derived from deploy/nginx/chat-hub.conf"
SITE=$TMP/nginx/chat-hub.conf
# The TLS server block also listens on a plain port so that ws:// goes through
# the same locations as wss://; the port-80 block keeps only its redirect.
# proxy_read_timeout/proxy_send_timeout 75s -> 5s: the idle check then needs
# chat-hub's pings to keep connections open.
sed -e "s#server 127\.0\.0\.1:8080 #server 127.0.0.1:$HUB_PORT #" \
    -e '/listen \[::\]/d' \
    -e "s#^\( *\)listen 80;#\1listen 127.0.0.1:$REDIR_PORT;#" \
    -e "s#^\( *\)listen 443 ssl;#\1listen 127.0.0.1:$HTTPS_PORT ssl;\n\1listen 127.0.0.1:$HTTP_PORT;#" \
    -e "s#^\( *\)ssl_certificate[[:space:]].*#\1ssl_certificate $TMP/tls/cert.pem;#" \
    -e "s#^\( *\)ssl_certificate_key[[:space:]].*#\1ssl_certificate_key $TMP/tls/key.pem;#" \
    -e 's#proxy_read_timeout 75s;#proxy_read_timeout 5s;#' \
    -e 's#proxy_send_timeout 75s;#proxy_send_timeout 5s;#' \
    -e "s#/var/log/nginx/#$TMP/nginx/logs/#g" \
    -e "s#root /var/www/letsencrypt;#root $TMP/nginx/acme;#" \
    -e "s#return 301 https://\$host\$request_uri;#return 301 https://\$host:$HTTPS_PORT\$request_uri;#" \
    "$ROOT/deploy/nginx/chat-hub.conf" >"$SITE"
# Every rewrite must have applied: a change to the deployed file that breaks
# one fails here instead of silently testing something else.
expect_count() { # count pattern what
    local n
    n=$(grep -v '^[[:space:]]*#' "$SITE" | grep -c -- "$2" || true)
    [ "$n" = "$1" ] || die "derived nginx config: expected $1 line(s) matching '$2' ($3), found $n; see deploy/nginx/chat-hub.conf"
}
expect_count 1 "server 127.0.0.1:$HUB_PORT " "the upstream"
expect_count 1 "listen 127.0.0.1:$REDIR_PORT;" "the redirect server"
expect_count 1 "listen 127.0.0.1:$HTTPS_PORT ssl;" "the TLS server"
expect_count 1 "listen 127.0.0.1:$HTTP_PORT;" "the plain listener of the TLS server"
expect_count 1 "proxy_read_timeout 5s;" "/ws read timeout"
expect_count 1 "proxy_send_timeout 5s;" "/ws send timeout"
expect_count 1 "ssl_certificate $TMP/tls/cert.pem;" "certificate"
expect_count 1 "ssl_certificate_key $TMP/tls/key.pem;" "key"
expect_count 1 "return 301 https://\$host:$HTTPS_PORT" "redirect"
expect_count 0 "listen 80\|listen 443\|/etc/letsencrypt\|/var/log\|75s\|:8080" "leftovers"

USER_LINE=
if [ "$(id -u)" = 0 ]; then
    if id www-data >/dev/null 2>&1; then USER_LINE="user www-data;"; else USER_LINE="user nobody nogroup;"; fi
fi
cat >"$TMP/nginx/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log notice;
events { worker_connections 512; }
http {
    access_log $TMP/nginx/logs/access.log;
    client_body_temp_path $TMP/nginx/tmp/body;
    proxy_temp_path $TMP/nginx/tmp/proxy;
    fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
    scgi_temp_path $TMP/nginx/tmp/scgi;
    include $SITE;
}
EOF
NGX=("$NGINX" -p "$TMP/nginx" -e "$TMP/nginx/logs/error.log" -c "$TMP/nginx/nginx.conf")
if out=$(timeout 30 "${NGX[@]}" -t 2>&1); then
    pass "nginx -t accepts the derived config"
else
    echo "$out"; fail "nginx -t"; die "nginx rejected the config"
fi
step "starting nginx"
"${NGX[@]}" -g 'daemon off;' &
NGINX_PID=$!

# ---------------------------------------------------------------- chat-hub
step "starting chat-hub ($BIN) on 127.0.0.1:$HUB_PORT, SQLite in $TMP/hub"
export DATABASE_URL=$TMP/hub/chat-hub.db
export CHAT_HUB_BIND=127.0.0.1:$HUB_PORT
export CHAT_HUB_HEARTBEAT_TIMEOUT_SECS=6   # pings every 2 s, inside nginx's 5 s
export CHAT_HUB_TRUSTED_PROXIES=127.0.0.1
export CHAT_HUB_API_KEY=e2e-api-key-$RANDOM$RANDOM$RANDOM
export CHAT_HUB_RATE_PER_SEC=1000 CHAT_HUB_RATE_BURST=1000  # the restart check sends fast
export RUST_LOG=info
unset CHAT_HUB_JWT_SECRET CHAT_HUB_ALLOWED_ORIGINS CHAT_HUB_DEV_LOGIN
HUB_LOG=$TMP/chat-hub.log
# The wrapper records chat-hub's exit status in hub.rc.<pid>: the e2e client
# SIGTERMs this process and checks that it exits 0.
(
    "$BIN" >>"$HUB_LOG" 2>&1 </dev/null &
    p=$!
    echo "$p" >"$TMP/hub.pid"
    wait "$p" && rc=0 || rc=$?
    echo "$rc" >"$TMP/hub.rc.$p"
) &

step "waiting for /healthz through nginx (https)"
ok=
for _ in $(seq 100); do
    if curl -fsS --max-time 2 --cacert "$TMP/tls/cert.pem" "https://127.0.0.1:$HTTPS_PORT/healthz" >/dev/null 2>&1; then
        ok=1; break
    fi
    kill -0 "$NGINX_PID" 2>/dev/null || die "nginx exited"
    sleep 0.2
done
[ -n "$ok" ] || die "chat-hub not healthy through nginx within 20 s"
echo "    ready after $((SECONDS - T0)) s"

# ---------------------------------------------------------------- e2e client
step "python venv with websockets"
python3 -m venv "$TMP/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
timeout 300 "$TMP/venv/bin/pip" install -q --disable-pip-version-check 'websockets>=13,<18' \
    || die "pip install websockets failed"
echo "    websockets $("$TMP/venv/bin/python" -c 'import websockets; print(websockets.__version__)')"

step "running tests/nginx/e2e.py"
e2e_rc=0
E2E_BIN=$BIN E2E_TMP=$TMP E2E_HTTP_PORT=$HTTP_PORT E2E_HTTPS_PORT=$HTTPS_PORT \
E2E_REDIR_PORT=$REDIR_PORT E2E_CA=$TMP/tls/cert.pem E2E_HUB_LOG=$HUB_LOG \
E2E_NGINX_ACCESS_LOG=$TMP/nginx/logs/chat-hub.access.log E2E_HUB_PID_FILE=$TMP/hub.pid \
    timeout 400 "$TMP/venv/bin/python" -u "$ROOT/tests/nginx/e2e.py" || e2e_rc=$?
if [ -f "$TMP/e2e.counts" ]; then
    read -r p f <"$TMP/e2e.counts"
    PASSED=$((PASSED + p)); FAILED=$((FAILED + f))
fi
if [ "$e2e_rc" != 0 ] && [ "$FAILED" = 0 ]; then fail "e2e.py exited $e2e_rc"; fi
kill -0 "$NGINX_PID" 2>/dev/null || fail "nginx died during the test"

echo "took $((SECONDS - T0)) s"
echo "nginx e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
