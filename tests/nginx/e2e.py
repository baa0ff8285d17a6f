"""End-to-end checks of chat-hub behind nginx (deploy/nginx/chat-hub.conf).

Started by tests/nginx/run.sh, which sets up nginx and the first chat-hub and
passes everything through the environment (E2E_*). Talks to 127.0.0.1 only;
every wait is bounded. Prints one line per check and a final summary
`nginx e2e: N passed, M failed`; exits non-zero if anything failed.
"""

import asyncio
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import traceback
import uuid

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

ENV = os.environ
BIN = ENV["E2E_BIN"]
TMP = ENV["E2E_TMP"]
HOST = "127.0.0.1"
HTTP_PORT = int(ENV["E2E_HTTP_PORT"])  # nginx, plain (the TLS server block also listens here)
HTTPS_PORT = int(ENV["E2E_HTTPS_PORT"])  # nginx, TLS
REDIR_PORT = int(ENV["E2E_REDIR_PORT"])  # nginx, the port-80 server block (redirect)
CA = ENV["E2E_CA"]
HUB_LOG = ENV["E2E_HUB_LOG"]
NGINX_ACCESS_LOG = ENV["E2E_NGINX_ACCESS_LOG"]
HUB_PID_FILE = ENV["E2E_HUB_PID_FILE"]
API_KEY = ENV["CHAT_HUB_API_KEY"]
NGINX_READ_TIMEOUT = 5  # what run.sh rewrote proxy_read_timeout to
RUN = uuid.uuid4().hex[:6]  # keeps user names apart between runs on one DB

TLS = ssl.create_default_context(cafile=CA)  # the test's self-signed cert, verified
URLS = {"ws": f"ws://{HOST}:{HTTP_PORT}/ws", "wss": f"wss://{HOST}:{HTTPS_PORT}/ws"}
TOKENS = set()

results = []


def log(msg):
    print(f"    {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


async def run_check(name, coro_fn, *args):
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(coro_fn(*args), 120)
        results.append((name, True))
        print(f"PASS {name} ({time.monotonic() - t0:.1f}s)", flush=True)
        return True
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        results.append((name, False))
        print(f"FAIL {name} ({time.monotonic() - t0:.1f}s): {type(e).__name__}: {e}", flush=True)
        if not isinstance(e, AssertionError):
            traceback.print_exc()
        return False


# ---------------------------------------------------------------- helpers


def token(user):
    out = subprocess.run([BIN, "token", user], capture_output=True, text=True, timeout=30)
    check(out.returncode == 0, f"chat-hub token {user}: exit {out.returncode}: {out.stderr.strip()}")
    lines = out.stdout.strip().splitlines()
    check(len(lines) == 1 and lines[0].count(".") == 2, f"chat-hub token printed {out.stdout!r}")
    TOKENS.add(lines[0])
    return lines[0]


def http_request(method, path, port=HTTPS_PORT, tls=True, headers=None, body=None, source=None):
    """One request to nginx; returns (status, headers dict, body bytes)."""
    src = (source, 0) if source else None
    if tls:
        c = http.client.HTTPSConnection(HOST, port, timeout=10, context=TLS, source_address=src)
    else:
        c = http.client.HTTPConnection(HOST, port, timeout=10, source_address=src)
    try:
        data = json.dumps(body).encode() if body is not None else None
        h = dict(headers or {})
        if data is not None:
            h["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def dm(a, b):
    return f"dm:{min(a, b)}:{max(a, b)}"


class Client:
    """A WebSocket session through nginx, with a buffer of frames not yet consumed."""

    def __init__(self, user, scheme, via_header=False):
        self.user, self.scheme, self.via_header = user, scheme, via_header
        self.ws = None
        self.frames = []  # received, not yet taken by expect()
        self.backlog = []

    async def open(self, timeout=15):
        tok = token(self.user)
        url, headers = URLS[self.scheme], {}
        if self.via_header:
            headers["Authorization"] = f"Bearer {tok}"
        else:
            url += f"?token={tok}"
        # ping_interval=None: the client sends no pings of its own, so only
        # chat-hub's pings (and the library's automatic pongs) cross nginx.
        self.ws = await asyncio.wait_for(
            connect(
                url,
                ssl=TLS if self.scheme == "wss" else None,
                additional_headers=headers,
                ping_interval=None,
                open_timeout=10,
                close_timeout=5,
            ),
            timeout,
        )
        welcome = await self.recv(10)
        check(welcome.get("type") == "welcome", f"{self.user}: first frame {welcome}")
        check(welcome.get("user") == self.user and welcome.get("protocol") == 1, f"welcome {welcome}")
        self.backlog = []
        while True:
            f = await self.recv(15)
            if f.get("type") == "synced":
                break
            if f.get("type") == "message":
                self.backlog.append(f)
            else:
                self.frames.append(f)
        return self

    async def recv(self, timeout):
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        check(isinstance(raw, str), f"binary frame from the server: {raw!r}")
        return json.loads(raw)

    async def send(self, frame):
        await self.ws.send(json.dumps(frame))

    async def expect(self, pred, what, timeout=10):
        """The first frame (buffered or new) matching pred; others stay buffered."""
        for i, f in enumerate(self.frames):
            if pred(f):
                return self.frames.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            check(left > 0, f"{self.user}: no {what} within {timeout}s (got {self.frames[-5:]})")
            try:
                f = await self.recv(left)
            except asyncio.TimeoutError:
                raise AssertionError(f"{self.user}: no {what} within {timeout}s (got {self.frames[-5:]})")
            if pred(f):
                return f
            self.frames.append(f)

    async def close(self):
        if self.ws is not None:
            await self.ws.close()


async def send_dm(sender, to, body, client_id=None):
    client_id = client_id or f"c-{uuid.uuid4().hex[:12]}"
    ref = f"r-{uuid.uuid4().hex[:8]}"
    await sender.send({"type": "send", "to": {"user": to}, "body": body, "client_id": client_id, "ref": ref})
    f = await sender.expect(lambda f: f.get("ref") == ref, f"answer to send {ref}")
    check(f.get("type") == "sent", f"{sender.user} -> {to}: {f}")
    check(f.get("conv") == dm(sender.user, to) and isinstance(f.get("seq"), int), f"sent {f}")
    return f


def is_msg(conv, seq):
    return lambda f: f.get("type") == "message" and f.get("conv") == conv and f.get("seq") == seq


# ---------------------------------------------------------------- checks


async def http_redirect():
    st, h, _ = http_request("GET", "/readyz?x=1", port=REDIR_PORT, tls=False)
    check(st == 301, f"port-80 server answered {st}")
    want = f"https://{HOST}:{HTTPS_PORT}/readyz?x=1"
    check(h.get("location") == want, f"Location {h.get('location')!r}, expected {want!r}")


async def health_endpoints():
    for tls, port in ((True, HTTPS_PORT), (False, HTTP_PORT)):
        st, _, body = http_request("GET", "/healthz", port=port, tls=tls)
        check(st == 200 and json.loads(body).get("status") == "ok", f"/healthz {st} {body!r}")
        st, _, body = http_request("GET", "/readyz", port=port, tls=tls)
        check(st == 200 and json.loads(body).get("status") == "ready", f"/readyz {st} {body!r}")
    c = http.client.HTTPSConnection(HOST, HTTPS_PORT, timeout=10, context=TLS)
    c.connect()
    log(f"TLS: {c.sock.version()} {c.sock.cipher()[0]}")
    check(c.sock.version() in ("TLSv1.2", "TLSv1.3"), f"negotiated {c.sock.version()}")
    c.close()


async def web_client_and_api():
    st, h, body = http_request("GET", "/")
    check(st == 200 and h.get("content-type", "").startswith("text/html"), f"GET / {st} {h.get('content-type')}")
    st, _, body = http_request("POST", "/api/messages", body={"from": "x", "to": {"user": "y"}, "body": "z"})
    check(st == 401 and json.loads(body).get("code") == "unauthorized", f"API without key: {st} {body!r}")
    alice, bob = f"api-a-{RUN}", f"api-b-{RUN}"
    st, _, body = http_request(
        "POST", "/api/messages", headers={"Authorization": f"Bearer {API_KEY}"},
        body={"from": alice, "to": {"user": bob}, "body": "from the backend"},
    )
    check(st == 201, f"POST /api/messages {st} {body!r}")
    r = json.loads(body)
    check(r.get("conv") == dm(alice, bob) and r.get("seq") == 1, f"API answer {r}")
    c = await Client(bob, "wss").open()
    try:
        got = [(m["conv"], m["seq"], m["body"]) for m in c.backlog]
        check(got == [(dm(alice, bob), 1, "from the backend")], f"{bob} backlog {got}")
    finally:
        await c.close()


async def dev_login_blocked():
    st, h, body = http_request("POST", "/dev/token", body={"user": "mallory"})
    check(st == 404 and b"nginx" in body, f"POST /dev/token through nginx: {st} {body[:80]!r}")


async def metrics_restricted():
    # 127.0.0.3 is not in the location's allow list; 127.0.0.1 is.
    st, _, body = http_request("GET", "/metrics", source="127.0.0.3")
    check(st == 403, f"/metrics from 127.0.0.3: {st}")
    st, h, body = http_request("GET", "/metrics")
    check(st != 403, f"/metrics from 127.0.0.1 refused: {st}")
    log(f"/metrics from 127.0.0.1 reaches chat-hub: {st} {h.get('content-type')}")


async def chat_both_ways(scheme):
    a, b = f"alice-{scheme}-{RUN}", f"bob-{scheme}-{RUN}"
    alice = await Client(a, scheme).open()
    bob = await Client(b, scheme, via_header=True).open()
    try:
        s = await send_dm(alice, b, "hi bob")
        m = await bob.expect(is_msg(s["conv"], s["seq"]), "alice's message")
        check(m["from"] == a and m["body"] == "hi bob" and m["client_id"] == s["client_id"], f"{m}")
        s2 = await send_dm(bob, a, "hi alice ✓")
        check(s2["seq"] == s["seq"] + 1, f"seq {s2['seq']} after {s['seq']}")
        m = await alice.expect(is_msg(s2["conv"], s2["seq"]), "bob's reply")
        check(m["from"] == b and m["body"] == "hi alice ✓", f"{m}")
        await bob.send({"type": "ack", "conv": s["conv"], "seq": s["seq"]})
        await alice.send({"type": "ack", "conv": s2["conv"], "seq": s2["seq"]})
    finally:
        await alice.close()
        await bob.close()


async def offline_backlog(scheme):
    a, c = f"alice-{scheme}-{RUN}", f"carol-{scheme}-{RUN}"
    alice = await Client(a, scheme).open()
    try:
        sent = [await send_dm(alice, c, f"while you were away {i}") for i in range(3)]
    finally:
        await alice.close()
    carol = await Client(c, scheme).open()  # everything before `synced` is in .backlog
    try:
        got = [(m["conv"], m["seq"], m["body"]) for m in carol.backlog]
        want = [(s["conv"], s["seq"], f"while you were away {i}") for i, s in enumerate(sent)]
        check(got == want, f"backlog before synced {got}, expected {want}")
    finally:
        await carol.close()


async def idle_survives(scheme):
    a, b = f"idle-a-{scheme}-{RUN}", f"idle-b-{scheme}-{RUN}"
    alice = await Client(a, scheme).open()
    bob = await Client(b, scheme).open()
    try:
        # No frames from either side for well past nginx's proxy_read_timeout:
        # only chat-hub's pings keep nginx from closing the upstream side.
        idle = NGINX_READ_TIMEOUT * 2 + 2
        t0 = time.monotonic()

        async def stay_open(c):
            while (left := idle - (time.monotonic() - t0)) > 0:
                try:
                    c.frames.append(json.loads(await asyncio.wait_for(c.ws.recv(), left)))
                except asyncio.TimeoutError:
                    pass  # the expected outcome: silence, and no close
                except ConnectionClosed as e:
                    raise AssertionError(f"{c.user}: closed after {time.monotonic() - t0:.1f}s idle: {e}")

        await asyncio.gather(stay_open(alice), stay_open(bob))
        for c in (alice, bob):
            await c.send({"type": "ping", "ref": "p1"})
            f = await c.expect(lambda f: f.get("type") == "pong", "pong", timeout=5)
            check(f.get("ref") == "p1", f"pong without the ping's ref: {f}")
        s = await send_dm(alice, b, "still here")
        await bob.expect(is_msg(s["conv"], s["seq"]), "message after the idle period")
    finally:
        await alice.close()
        await bob.close()


async def wait_for_log(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(HUB_LOG, encoding="utf-8", errors="replace") as f:
            for line in f:
                if pred(line):
                    return line
        await asyncio.sleep(0.2)
    return None


async def forwarded_for_in_access_log():
    # From 127.0.0.1 (a trusted proxy to chat-hub, like a load balancer in
    # front of nginx): the address it forwards is believed.
    probe = f"xff-{uuid.uuid4().hex[:8]}"
    st, _, _ = http_request("GET", f"/healthz?probe={probe}", headers={"X-Forwarded-For": "203.0.113.7"})
    check(st == 200, f"/healthz {st}")
    line = await wait_for_log(lambda l: f"probe={probe}" in l)
    check(line is not None, f"no access-log line for {probe} in {HUB_LOG}")
    check('203.0.113.7 "GET /healthz?probe=' in line, f"access log: {line.strip()}")
    # From 127.0.0.3 (not trusted): a forged X-Forwarded-For is not believed,
    # the log shows the address nginx saw.
    probe = f"xff-{uuid.uuid4().hex[:8]}"
    st, _, _ = http_request(
        "GET", f"/healthz?probe={probe}", headers={"X-Forwarded-For": "198.51.100.9"}, source="127.0.0.3"
    )
    check(st == 200, f"/healthz {st}")
    line = await wait_for_log(lambda l: f"probe={probe}" in l)
    check(line is not None, f"no access-log line for {probe}")
    check('127.0.0.3 "GET /healthz?probe=' in line and "198.51.100.9" not in line, f"access log: {line.strip()}")


async def no_tokens_in_logs():
    check(TOKENS, "no tokens were minted")
    line = await wait_for_log(lambda l: "/ws?token=REDACTED" in l, timeout=5)
    check(line is not None, "no `/ws?token=REDACTED` line in chat-hub's access log")
    for path in (HUB_LOG, NGINX_ACCESS_LOG):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        leaked = [t for t in TOKENS if t in text or t.split(".")[2] in text]
        check(not leaked, f"{len(leaked)} client token(s) written to {path}")


# ---------------------------------------------------------------- restart


def hub_pid():
    with open(HUB_PID_FILE) as f:
        return int(f.read().strip())


async def stop_hub(pid, rc_of, timeout=20):
    """SIGTERM chat-hub; returns its exit status (rc_of(pid) reads it)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = rc_of(pid)
        if rc is not None:
            return rc
        await asyncio.sleep(0.1)
    raise AssertionError(f"chat-hub (pid {pid}) still running {timeout}s after SIGTERM")


def rc_from_file(pid):
    """Exit status of the chat-hub that run.sh started (its wrapper writes it)."""
    try:
        with open(os.path.join(TMP, f"hub.rc.{pid}")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


NEW_HUBS = []


def start_hub():
    log_f = open(HUB_LOG, "ab")
    p = subprocess.Popen([BIN], stdout=log_f, stderr=log_f, stdin=subprocess.DEVNULL)
    log_f.close()
    NEW_HUBS.append(p)
    with open(HUB_PID_FILE, "w") as f:
        f.write(f"{p.pid}\n")
    return p


async def wait_ready(timeout=30):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            st, _, _ = http_request("GET", "/readyz")
            if st == 200:
                return
            last = st
        except OSError as e:
            last = e
        await asyncio.sleep(0.2)
    raise AssertionError(f"chat-hub not ready through nginx within {timeout}s (last: {last})")


async def reconnect(user, scheme, timeout=30):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return await Client(user, scheme).open()
        except (OSError, WebSocketException, asyncio.TimeoutError) as e:
            last = e
            await asyncio.sleep(0.3)
    raise AssertionError(f"{user} could not reconnect within {timeout}s: {last}")


async def graceful_restart():
    scheme = "wss"
    d, e = f"dave-{RUN}", f"erin-{RUN}"
    conv = dm(d, e)
    dave = await Client(d, scheme).open()
    erin = await Client(e, scheme).open()
    acked_by_dave = {}  # client_id -> seq, from `sent`
    received = {}  # seq -> client_id, everything erin got (deduplicated by (conv, seq))
    issued = []  # every client_id dave sent
    close_codes = {}
    errors = {}  # error code -> count, answers to dave's sends around the shutdown

    async def sender():
        i = 0
        try:
            while True:
                cid = f"g-{RUN}-{i:04d}"
                issued.append(cid)
                await dave.send({"type": "send", "to": {"user": e}, "body": f"restart {i}", "client_id": cid})
                i += 1
                await asyncio.sleep(0.005)
        except ConnectionClosed:
            pass

    async def dave_reader():
        try:
            while True:
                f = json.loads(await dave.ws.recv())
                if f.get("type") == "sent":
                    check(f["conv"] == conv, f"sent {f}")
                    acked_by_dave[f["client_id"]] = f["seq"]
                elif f.get("type") == "error":
                    errors[f.get("code")] = errors.get(f.get("code"), 0) + 1
        except ConnectionClosed as ex:
            close_codes["dave"] = ex.rcvd.code if ex.rcvd else None

    async def erin_reader():
        contiguous = 0
        try:
            while True:
                f = json.loads(await erin.ws.recv())
                if f.get("type") == "message" and f["conv"] == conv:
                    received[f["seq"]] = f["client_id"]
                    while contiguous + 1 in received:
                        contiguous += 1
                    await erin.send({"type": "ack", "conv": conv, "seq": contiguous})
        except ConnectionClosed as ex:
            close_codes["erin"] = ex.rcvd.code if ex.rcvd else None

    tasks = [asyncio.create_task(t()) for t in (sender, dave_reader, erin_reader)]
    await asyncio.sleep(1.0)
    check(acked_by_dave, "nothing was `sent` before the restart")
    pid = hub_pid()
    n_before = len(acked_by_dave)
    t0 = time.monotonic()
    rc = await stop_hub(pid, rc_from_file)
    log(f"SIGTERM: chat-hub exited {rc} after {time.monotonic() - t0:.1f}s; "
        f"{n_before} `sent` when signalled, {len(acked_by_dave)} in all, {len(issued)} sends issued, "
        f"errors {errors or 'none'}")
    done, pending = await asyncio.wait(tasks, timeout=10)
    for t in pending:
        t.cancel()
    check(not pending, "sessions still open 10s after chat-hub exited")
    check(rc == 0, f"chat-hub exit status after SIGTERM: {rc}")
    check(close_codes.get("dave") == 1001 and close_codes.get("erin") == 1001,
          f"close codes seen through nginx: {close_codes} (expected 1001)")

    new = start_hub()
    await wait_ready()
    dave = await reconnect(d, scheme)
    erin = await reconnect(e, scheme)
    try:
        for m in erin.backlog:
            check(m["conv"] == conv, f"unexpected backlog {m}")
            received[m["seq"]] = m["client_id"]
        lost = {cid: seq for cid, seq in acked_by_dave.items() if received.get(seq) != cid}
        check(not lost, f"{len(lost)} acknowledged message(s) not received after restart: {sorted(lost.items())[:5]}")
        # The client retries what was never acknowledged, with the same
        # client_id: stored at most once, and every one of them arrives.
        retry = [cid for cid in issued if cid not in acked_by_dave]
        for cid in retry:
            i = int(cid.rsplit("-", 1)[1])
            s = await send_dm(dave, e, f"restart {i}", client_id=cid)
            acked_by_dave[cid] = s["seq"]
        deadline = time.monotonic() + 15
        while set(acked_by_dave.values()) - set(received) and time.monotonic() < deadline:
            try:
                f = await erin.recv(max(deadline - time.monotonic(), 0.1))
            except asyncio.TimeoutError:
                break
            if f.get("type") == "message":
                received[f["seq"]] = f["client_id"]
        seqs = sorted(acked_by_dave.values())
        check(len(set(seqs)) == len(seqs), "one seq acknowledged for two client_ids")
        check(sorted(received) == list(range(1, len(issued) + 1)),
              f"erin's seqs are not 1..{len(issued)}: {len(received)} received, max {max(received, default=0)}")
        check(sorted(received.values()) == sorted(issued), "a client_id stored twice or missing")
        log(f"after restart: {len(retry)} retried, {len(received)} messages, seqs 1..{len(issued)} without gaps")
    finally:
        await dave.close()
        await erin.close()
    # And the restarted process also stops cleanly.
    new.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(new.wait, 20)
    check(rc == 0, f"restarted chat-hub exit status after SIGTERM: {rc}")


# ---------------------------------------------------------------- main


async def main():
    await run_check("http-to-https redirect", http_redirect)
    await run_check("healthz/readyz via http and https (TLS 1.2+)", health_endpoints)
    await run_check("web client and server API through nginx", web_client_and_api)
    await run_check("/dev/ blocked at nginx", dev_login_blocked)
    await run_check("/metrics only from allowed addresses", metrics_restricted)
    for scheme in ("ws", "wss"):
        await run_check(f"{scheme}: chat between two users both ways", chat_both_ways, scheme)
        await run_check(f"{scheme}: offline backlog before synced", offline_backlog, scheme)

    async def both_idle():
        oks = await asyncio.gather(*(run_check(f"{s}: idle {NGINX_READ_TIMEOUT * 2 + 2}s past nginx's "
                                               f"{NGINX_READ_TIMEOUT}s read timeout, then ping/pong",
                                               idle_survives, s) for s in ("ws", "wss")))
        return oks

    await both_idle()
    await run_check("X-Forwarded-For through nginx in chat-hub's access log", forwarded_for_in_access_log)
    await run_check("graceful restart behind nginx loses nothing acknowledged (wss)", graceful_restart)
    await run_check("no client token in chat-hub's or nginx's logs", no_tokens_in_logs)


if __name__ == "__main__":
    t0 = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(main(), 300))
    except Exception as e:  # noqa: BLE001
        results.append(("e2e driver", False))
        print(f"FAIL e2e driver: {type(e).__name__}: {e}", flush=True)
    finally:
        for p in NEW_HUBS:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    passed = sum(1 for _, ok in results if ok)
    failed = len(results) - passed
    print(f"e2e client: {passed} checks passed, {failed} failed in {time.monotonic() - t0:.1f}s")
    with open(os.path.join(TMP, "e2e.counts"), "w") as f:
        f.write(f"{passed} {failed}\n")
    sys.exit(1 if failed or not results else 0)
