"""End-to-end checks of chat-hub's cluster mode (three nodes, Redis, MariaDB, nginx).

Started by tests/cluster/run.sh, which starts a private Redis, three nodes
sharing one fresh database, and nginx with an upstream of the three, and
passes everything through the environment (E2E_*). The nodes and Redis are
started from launcher scripts in E2E_TMP (nodeN.sh, redis.sh) that write their
pid to nodeN.pid / redis.pid: the checks kill and restart them with those.
Talks to 127.0.0.1 only; every wait is bounded. Prints one line per check and
a final summary; exits non-zero if anything failed.
"""

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

ENV = os.environ
TMP = ENV["E2E_TMP"]
HOST = "127.0.0.1"
PORTS = [int(p) for p in ENV["E2E_NODE_PORTS"].split(",")]
NODE_IDS = ENV["E2E_NODE_IDS"].split(",")
NGINX_PORT = int(ENV["E2E_NGINX_PORT"])
REDIS_PORT = int(ENV["E2E_REDIS_PORT"])
API_KEY = ENV["E2E_API_KEY"]
RUN = ENV.get("E2E_RUN") or uuid.uuid4().hex[:8]
NGINX = "nginx"  # a Client's `where` meaning "through nginx" rather than a node index

PEER_BEAT_SECS = 5  # the contract: nodes beat every 5 s, entries expire after 15 s
OFFLINE_AFTER_KILL_SECS = 25  # a SIGKILLed node's users reported offline within this

results = []
STARTED = []  # processes this script started (reaped at the end)


def log(msg):
    print(f"    {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


ONLY = ENV.get("E2E_ONLY", "")  # run only the checks whose name contains this (debugging)
REPEAT = int(ENV.get("E2E_REPEAT", "1"))  # run each check this many times (hunting flakes)


async def run_check(name, coro_fn, *args, timeout=150):
    if ONLY and ONLY not in name:
        return True
    ok = True
    for _ in range(REPEAT):
        ok &= await run_check_once(name, coro_fn, *args, timeout=timeout)
    return ok


async def run_check_once(name, coro_fn, *args, timeout=150):
    t0 = time.monotonic()
    ROUND[0] += 1
    try:
        await asyncio.wait_for(coro_fn(*args), timeout)
        results.append((name, True))
        print(f"PASS {name} ({time.monotonic() - t0:.1f}s)", flush=True)
        return True
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        results.append((name, False))
        what = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
        print(f"FAIL {name} ({time.monotonic() - t0:.1f}s): {what}", flush=True)
        if not isinstance(e, (AssertionError, asyncio.TimeoutError)):
            traceback.print_exc()
        return False


async def until(pred, timeout, interval=0.1):
    """Poll pred() (sync or async) until true or timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v or time.monotonic() >= deadline:
            return v
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- HTTP


def http_request(port, method, path, body=None, headers=None, timeout=10):
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        h = dict(headers or {})
        if data is not None:
            h["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


async def http_async(port, method, path, body=None, headers=None, timeout=10):
    return await asyncio.to_thread(http_request, port, method, path, body, headers, timeout)


def api(node, method, path, body=None):
    return http_async(PORTS[node], method, path, body, {"Authorization": f"Bearer {API_KEY}"})


async def metrics(node):
    """/metrics of a node as {(name, frozenset(labels)): value}; None if it does not answer."""
    try:
        st, body = await http_async(PORTS[node], "GET", "/metrics", timeout=5)
    except OSError:
        return None
    if st != 200:
        return None
    out = {}
    for line in body.decode("utf-8", "replace").splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)', line)
        if not m or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return out


def metric(ms, name, **labels):
    """The value of the one series `name` whose labels include `labels` (None: none or several)."""
    if ms is None:
        return None
    want = set(labels.items())
    found = [v for (n, ls), v in ms.items() if n == name and want <= ls]
    return found[0] if len(found) == 1 else None


TOKENS = {}


async def token(user):
    if user in TOKENS:
        return TOKENS[user]
    last = None
    for node in range(3):  # any live node signs for the whole cluster (one shared secret)
        try:
            st, body = await http_async(PORTS[node], "POST", "/dev/token", {"user": user}, timeout=5)
        except OSError as e:
            last = e
            continue
        check(st == 200, f"POST /dev/token on node {node + 1}: {st} {body[:200]!r}")
        TOKENS[user] = json.loads(body)["token"]
        return TOKENS[user]
    raise AssertionError(f"no node answered POST /dev/token: {last}")


# ---------------------------------------------------------------- processes


def pid_of(name):
    try:
        with open(os.path.join(TMP, f"{name}.pid")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid):
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


async def kill(name, sig, timeout=15):
    pid = pid_of(name)
    check(alive(pid), f"{name} (pid {pid}) is not running")
    os.kill(pid, sig)
    gone = await until(lambda: not alive(pid), timeout)
    check(gone, f"{name} (pid {pid}) still running {timeout}s after signal {sig}")
    for p in STARTED:
        if p.pid == pid:
            p.wait(1)


def launch(name):
    p = subprocess.Popen(["bash", os.path.join(TMP, f"{name}.sh")], stdin=subprocess.DEVNULL)
    STARTED.append(p)
    return p


async def start_node(node, timeout=40):
    launch(f"node{node + 1}")

    async def ready():
        try:
            st, _ = await http_async(PORTS[node], "GET", "/readyz", timeout=2)
            return st == 200
        except OSError:
            return False

    ok = await until(ready, timeout, 0.2)
    check(ok, f"node {node + 1} not ready within {timeout}s after restart")


def redis_ping():
    try:
        with socket.create_connection((HOST, REDIS_PORT), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


async def start_redis(timeout=15):
    launch("redis")
    ok = await until(lambda: asyncio.to_thread(redis_ping), timeout, 0.1)
    check(ok, f"redis-server not answering within {timeout}s after restart")


async def cluster_state(nodes=(0, 1, 2)):
    out = {}
    for n in nodes:
        ms = await metrics(n)
        out[n + 1] = (metric(ms, "chat_hub_cluster_bus_up"), metric(ms, "chat_hub_cluster_nodes"))
    return out


async def wait_cluster(nodes=(0, 1, 2), peers=2, timeout=30):
    """Every listed node: bus up and `peers` other live nodes seen."""
    state = {}

    async def formed():
        nonlocal state
        state = await cluster_state(nodes)
        return all(bus == 1 and seen == peers for bus, seen in state.values())

    ok = await until(formed, timeout, 0.25)
    check(ok, f"cluster not formed within {timeout}s: (bus_up, nodes) per node {state}")


# ---------------------------------------------------------------- WebSocket client


def dm(a, b):
    return f"dm:{min(a, b)}:{max(a, b)}"


class Client:
    """One WebSocket session on a node (index) or through nginx, read by a background task.

    Every frame goes to `inbox` (taken by expect()); message frames are also
    recorded: `msgs` (this connection's, arrival order, backlog included),
    `seen` (conv -> seqs, shared across reconnects of one user), `sent`
    (client_id -> (seq, monotonic time) of `sent` answers). With auto_ack the
    client acks each conversation up to its contiguous seq (from 1).
    """

    def __init__(self, user, where, seen=None, auto_ack=False):
        self.user, self.where = user, where
        self.seen = seen if seen is not None else {}
        self.auto_ack = auto_ack
        self.acked = {}
        self.inbox, self.msgs, self.backlog = [], [], []
        self.sent, self.errors = {}, []
        self.conn_seen = {}  # conv -> seqs received on this connection
        self.conn_last = {}  # conv -> highest seq received on this connection
        self.disorder = []  # (conv, seq after last) seen out of order on this connection
        self.closed = asyncio.Event()
        self.close_code = None
        self.synced_at = None
        self.ws = None
        self.task = None
        self.wake = asyncio.Event()

    @property
    def url(self):
        port = NGINX_PORT if self.where == NGINX else PORTS[self.where]
        return f"ws://{HOST}:{port}/ws"

    def label(self):
        return f"{self.user}@{'nginx' if self.where == NGINX else f'node{self.where + 1}'}"

    async def open(self, timeout=20):
        tok = await token(self.user)
        self.ws = await asyncio.wait_for(
            connect(f"{self.url}?token={tok}", open_timeout=10, close_timeout=3, ping_interval=None,
                    max_size=2**22),
            timeout,
        )
        welcome = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        check(welcome.get("type") == "welcome" and welcome.get("user") == self.user,
              f"{self.label()}: first frame {welcome}")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            check(left > 0, f"{self.label()}: no `synced` within {timeout}s")
            f = json.loads(await asyncio.wait_for(self.ws.recv(), left))
            if f.get("type") == "synced":
                break
            if f.get("type") == "message":
                self.backlog.append(f)
            await self._take(f)
        self.synced_at = time.monotonic()
        self.task = asyncio.create_task(self._reader())
        return self

    async def _take(self, f):
        t = f.get("type")
        if t == "message":
            conv, seq = f["conv"], f["seq"]
            have = self.conn_seen.setdefault(conv, set())
            if seq < self.conn_last.get(conv, 0) and seq not in have:
                self.disorder.append((conv, seq, self.conn_last[conv]))
            have.add(seq)
            self.conn_last[conv] = max(seq, self.conn_last.get(conv, 0))
            self.seen.setdefault(conv, set()).add(seq)
            self.msgs.append(f)
            if self.auto_ack:
                s, upto = self.seen[conv], self.acked.get(conv, 0)
                while upto + 1 in s:
                    upto += 1
                if upto > self.acked.get(conv, 0):
                    self.acked[conv] = upto
                    try:
                        await self.ws.send(json.dumps({"type": "ack", "conv": conv, "seq": upto}))
                    except ConnectionClosed:
                        pass
        elif t == "sent":
            self.sent[f.get("client_id")] = (f["seq"], time.monotonic(), f["conv"])
        elif t == "error":
            self.errors.append(f)
        self.inbox.append(f)
        self.wake.set()

    async def _reader(self):
        try:
            async for raw in self.ws:
                await self._take(json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            rcvd = getattr(getattr(self.ws, "protocol", None), "close_rcvd", None)
            self.close_code = rcvd.code if rcvd else None
            self.closed.set()
            self.wake.set()

    async def send(self, frame):
        await self.ws.send(json.dumps(frame))

    async def expect(self, pred, what, timeout=10):
        """The first frame in the inbox matching pred (taken out of it), waiting up to timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.inbox):
                if pred(f):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0 or self.closed.is_set():
                recent = [f for f in self.inbox if f.get("type") != "message"][-4:]
                raise AssertionError(f"{self.label()}: no {what} within {timeout}s"
                                     f"{' (connection closed)' if self.closed.is_set() else ''}; "
                                     f"other frames: {recent}")
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except asyncio.TimeoutError:
                pass

    def has(self, pred):
        return any(pred(f) for f in self.inbox)

    async def close(self):
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 5)
            except (asyncio.TimeoutError, OSError, WebSocketException):
                pass
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 5)
            except asyncio.TimeoutError:
                self.task.cancel()


async def open_all(clients):
    return await asyncio.gather(*(c.open() for c in clients))


async def close_all(clients):
    await asyncio.gather(*(c.close() for c in clients if c is not None), return_exceptions=True)


async def send_and_wait(client, to, body, cid=None):
    cid = cid or f"c-{uuid.uuid4().hex[:12]}"
    ref = f"r-{uuid.uuid4().hex[:8]}"
    await client.send({"type": "send", "to": to, "body": body, "client_id": cid, "ref": ref})
    f = await client.expect(lambda f: f.get("ref") == ref, f"answer to send {ref}")
    check(f.get("type") == "sent", f"{client.label()} send to {to}: {f}")
    return f


def is_msg(conv, seq):
    return lambda f: f.get("type") == "message" and f.get("conv") == conv and f.get("seq") == seq


def is_presence(user, online):
    return lambda f: f.get("type") == "presence" and f.get("user") == user and f.get("online") is online


def is_group_event(event, group, user=None):
    return lambda f: (f.get("type") == "group" and f.get("event") == event and f.get("group") == group
                      and (user is None or f.get("user") == user))


ROUND = [0]  # bumped per check run, so that repeated checks use fresh users and groups


def u(name):
    return f"{name}-{RUN}" + (f"-{ROUND[0]}" if ROUND[0] else "")


# ---------------------------------------------------------------- checks


async def cluster_formed():
    await wait_cluster(timeout=3 * PEER_BEAT_SECS + 5)
    ids = []
    for n in range(3):
        ms = await metrics(n)
        check(ms is not None, f"node {n + 1}: no /metrics")
        infos = [dict(labels).get("node") for (name, labels), v in ms.items()
                 if name == "chat_hub_node_info" and v == 1]
        check(infos == [NODE_IDS[n]], f"node {n + 1}: chat_hub_node_info {infos}, expected [{NODE_IDS[n]!r}]")
        ids.extend(infos)
    check(len(set(ids)) == 3, f"node ids not distinct: {ids}")
    log(f"node ids {ids}; each node: bus up, 2 other nodes seen")


async def direct_across_nodes():
    a, b = u("alice"), u("bob")
    alice, bob, alice2 = Client(a, 0), Client(b, 1), Client(a, 2)
    try:
        await open_all([alice, bob, alice2])
        conv = dm(a, b)
        s1 = await send_and_wait(alice, {"user": b}, "hi bob, from node 1")
        m = await bob.expect(is_msg(conv, s1["seq"]), "alice's message on node 2")
        check(m["from"] == a and m["body"] == "hi bob, from node 1" and m.get("client_id") == s1["client_id"], f"{m}")
        m = await alice2.expect(is_msg(conv, s1["seq"]), "alice's own message on her node-3 device")
        check(m["from"] == a, f"{m}")
        s2 = await send_and_wait(bob, {"user": a}, "hi alice, from node 2")
        check(s2["seq"] == s1["seq"] + 1, f"seq {s2['seq']} after {s1['seq']}")
        for c in (alice, alice2):
            m = await c.expect(is_msg(conv, s2["seq"]), "bob's reply")
            check(m["from"] == b and m["body"] == "hi alice, from node 2", f"{m}")
        # A burst from the node-3 device: every session gets it in seq order.
        seqs = [(await send_and_wait(alice2, {"user": b}, f"burst {i}"))["seq"] for i in range(10)]
        check(seqs == list(range(s2["seq"] + 1, s2["seq"] + 11)), f"burst seqs {seqs}")
        # bob: alice's messages; alice on node 1: bob's reply and her own burst
        # from node 3; the node-3 device: what the others sent, not its own.
        for c, want in ((bob, [s1["seq"]] + seqs), (alice, [s2["seq"]] + seqs)):
            await c.expect(is_msg(conv, seqs[-1]), "the end of the burst")
            got = [f["seq"] for f in c.msgs if f["conv"] == conv]
            check(got == want, f"{c.label()} received seqs {got}, expected {want}")
        got = [f["seq"] for f in alice2.msgs if f["conv"] == conv]
        check(got == [s1["seq"], s2["seq"]], f"{alice2.label()} got {got} (own burst must not echo to it)")
    finally:
        await close_all([alice, bob, alice2])


async def group_across_nodes():
    g = u("grp")
    names = [u(f"gm{i}") for i in range(6)]
    clients = [Client(n, i % 3) for i, n in enumerate(names)]
    newcomer = None
    try:
        await open_all(clients)
        st, body = await api(1, "POST", "/api/groups",
                             {"group": g, "name": "Cluster team", "owner": names[0], "members": names[1:]})
        check(st == 201, f"POST /api/groups on node 2: {st} {body[:200]!r}")
        for c in clients:
            f = await c.expect(is_group_event("created", g), "the group's `created` event")
            check(sorted(f.get("members", [])) == sorted(names), f"{c.label()}: created {f}")
        # Everyone sends 10 messages at once; everyone gets all the others' in seq order.
        k = 10

        async def burst(i, c):
            for j in range(k):
                await c.send({"type": "send", "to": {"group": g}, "body": f"m{i}-{j}", "client_id": f"{g}-{i}-{j}"})
            await until(lambda: len([x for x in c.sent if x.startswith(f"{g}-{i}-")]) >= k
                        or c.errors, 20)

        await asyncio.gather(*(burst(i, c) for i, c in enumerate(clients)))
        conv = f"group:{g}"
        for c in clients:
            check(not c.errors, f"{c.label()}: errors {c.errors[:3]}")
        own = {c.user: {seq for cid, (seq, _, _) in c.sent.items() if cid.startswith(f"{g}-")} for c in clients}
        all_seqs = set().union(*own.values())
        check(sorted(all_seqs) == list(range(1, 6 * k + 1)), f"`sent` seqs are not 1..{6 * k}: {sorted(all_seqs)}")
        for c in clients:
            want = sorted(all_seqs - own[c.user])
            await until(lambda: len(c.seen.get(conv, ())) >= len(want), 15)
            got = [f["seq"] for f in c.msgs if f["conv"] == conv]
            if got != want:
                missing = sorted(set(want) - set(got))
                who = {seq: x.label() for x in clients for cid, (seq, _, _) in x.sent.items()
                       if cid.startswith(f"{g}-") and seq in missing}
                raise AssertionError(f"{c.label()}: received {len(got)} of {len(want)} messages; missing "
                                     f"{[(q, who.get(q)) for q in missing[:8]]}; order ok: {got == sorted(got)}")
        bodies = {f["seq"]: (f["from"], f["body"]) for f in clients[0].msgs if f["conv"] == conv}
        for c in clients[1:]:
            for f in c.msgs:
                if f["conv"] == conv and f["seq"] in bodies:
                    check(bodies[f["seq"]] == (f["from"], f["body"]), f"seq {f['seq']} differs between sessions")
        log(f"{6 * k} messages from 6 members on 3 nodes, each member got the other {5 * k} in order")

        # A change through node 3's API reaches members on every node.
        newcomer = Client(u("gnew"), 0)
        await newcomer.open()
        st, body = await api(2, "PUT", f"/api/groups/{g}/members/{newcomer.user}")
        check(st == 204, f"PUT member on node 3: {st} {body[:200]!r}")
        for c in clients + [newcomer]:
            await c.expect(is_group_event("added", g, newcomer.user), f"`added` {newcomer.user}")
        s = await send_and_wait(newcomer, {"group": g}, "hello from the newcomer")
        for c in clients:
            await c.expect(is_msg(conv, s["seq"]), "the newcomer's message")
        # A change over the owner's WebSocket on node 1 reaches every node, and
        # the removed member (node 2) gets no more of the group's messages.
        gone = clients[1]
        await clients[0].send({"type": "group_remove", "group": g, "user": gone.user, "ref": "rm"})
        for c in clients + [newcomer]:
            await c.expect(is_group_event("removed", g, gone.user), f"`removed` {gone.user}")
        s = await send_and_wait(clients[2], {"group": g}, "after the removal")
        for c in [x for x in clients if x is not gone and x is not clients[2]] + [newcomer]:
            await c.expect(is_msg(conv, s["seq"]), "the message after the removal")
        # Then a direct message from the same sender (node 3) to the removed
        # member (node 2): once it is there, the group message would have been too.
        d = await send_and_wait(clients[2], {"user": gone.user}, "marker")
        await gone.expect(is_msg(dm(clients[2].user, gone.user), d["seq"]), "the marker message")
        check(not gone.has(is_msg(conv, s["seq"])), f"{gone.label()} still got a group message after its removal")
    finally:
        await close_all(clients + [newcomer])


async def presence_across_nodes():
    c_name, d_name = u("carol"), u("dave")
    carol = Client(c_name, 0)
    dave_a = dave_b = None
    try:
        await carol.open()
        await send_and_wait(carol, {"user": d_name}, "are you there?")  # now they are contacts
        dave_a = Client(d_name, 1)
        await dave_a.open()
        await carol.expect(is_presence(d_name, True), "presence: dave online (he is on node 2)")
        # Online on two nodes; leaving one of them is not going offline.
        dave_b = Client(d_name, 2)
        await dave_b.open()
        await dave_a.close()
        # Nothing to wait for but the absence of a frame: a bounded look.
        early = await until(lambda: carol.has(is_presence(d_name, False)), 2)
        check(not early, "dave reported offline while still online on node 3")
        await dave_b.close()
        await carol.expect(is_presence(d_name, False), "presence: dave offline after his last session closed")
    finally:
        await close_all([carol, dave_a, dave_b])


async def presence_on_connect_across_nodes():
    e_name, f_name = u("erin"), u("frank")
    erin = Client(e_name, 0)
    frank = None
    try:
        await erin.open()
        await send_and_wait(erin, {"user": f_name}, "hello")
        frank = Client(f_name, 2)
        await frank.open()
        await frank.expect(is_presence(e_name, True), "presence on connect: erin (node 1) online", timeout=5)
    finally:
        await close_all([erin, frank])


async def disconnect_api_across_nodes():
    g_name = u("gina")
    s3, s2 = Client(g_name, 2), Client(g_name, 1)
    try:
        await open_all([s3, s2])
        st, body = await api(0, "POST", f"/api/users/{g_name}/disconnect")
        check(st == 200, f"POST /api/users/{g_name}/disconnect on node 1: {st} {body[:200]!r}")
        closed = json.loads(body).get("closed")
        log(f"answer {json.loads(body)} (sessions on nodes 2 and 3)")
        check(isinstance(closed, int) and closed >= 1, f"closed = {closed!r}")
        for c in (s3, s2):
            ok = await until(lambda: c.closed.is_set(), 10)
            check(ok, f"{c.label()} still open 10s after the disconnect")
            check(c.close_code == 4001, f"{c.label()} closed with {c.close_code}, expected 4001")
        check(closed == 2, f"closed = {closed}, expected 2 (one session on node 2, one on node 3)")
    finally:
        await close_all([s3, s2])


async def presence_after_sigkill():
    h_name, i_name = u("hank"), u("iris")
    hank = Client(h_name, 0)
    iris = None
    try:
        await hank.open()
        await send_and_wait(hank, {"user": i_name}, "ping")
        iris = Client(i_name, 2)
        await iris.open()
        await hank.expect(is_presence(i_name, True), "presence: iris online (node 3)")
        t0 = time.monotonic()
        await kill("node3", signal.SIGKILL)
        await hank.expect(is_presence(i_name, False), "presence: iris offline after node 3 was SIGKILLed",
                          timeout=OFFLINE_AFTER_KILL_SECS)
        log(f"iris reported offline {time.monotonic() - t0:.1f}s after SIGKILL of node 3")
        await wait_cluster(nodes=(0, 1), peers=1, timeout=10)
    finally:
        await close_all([hank, iris])
        if not alive(pid_of("node3")):
            await start_node(2)
    await wait_cluster(timeout=3 * PEER_BEAT_SECS + 10)


class Pump:
    """A sender sending to one user every `interval` until stopped; `sent` answers land on the client."""

    def __init__(self, client, to, tag, interval=0.02):
        self.client, self.to, self.tag, self.interval = client, to, tag, interval
        self.stop = asyncio.Event()
        self.issued = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self):
        try:
            while not self.stop.is_set() and not self.client.closed.is_set():
                cid = f"{self.tag}-{self.issued}"
                await self.client.send({"type": "send", "to": {"user": self.to}, "body": cid, "client_id": cid})
                self.issued += 1
                try:
                    await asyncio.wait_for(self.stop.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
        except ConnectionClosed:
            pass

    def sent_seqs(self, before=None):
        return {seq for cid, (seq, t, _) in self.client.sent.items()
                if cid.startswith(f"{self.tag}-") and (before is None or t < before)}

    async def finish(self):
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        # Every send answered (or the session is gone).
        await until(lambda: len(self.sent_seqs()) + len(self.client.errors) >= self.issued
                    or self.client.closed.is_set(), 10)


async def node_killed_during_traffic():
    victim = 1  # node 2; its users reconnect through nginx to nodes 1 and 3
    pairs = [(u(f"ks{i}"), u(f"kr{i}"), 0 if i % 2 == 0 else 2) for i in range(4)]
    senders = [Client(s, node) for s, _, node in pairs]
    receivers = [Client(r, victim, auto_ack=True) for _, r, _ in pairs]
    # And one user of the victim sending to a user on node 3, who stays connected.
    vs, vr = Client(u("kvs"), victim), Client(u("kvr"), 2, auto_ack=True)
    again = []
    pumps = []
    try:
        await open_all(senders + receivers + [vs, vr])
        pumps = [Pump(s, r, f"k{i}-{RUN}") for i, (s, (_, r, _)) in enumerate(zip(senders, pairs))]
        vpump = Pump(vs, vr.user, f"kv-{RUN}")
        await until(lambda: all(len(p.sent_seqs()) >= 20 for p in pumps + [vpump]), 10)
        await kill(f"node{victim + 1}", signal.SIGKILL)
        killed_at = time.monotonic()
        for r in receivers:
            ok = await until(lambda: r.closed.is_set(), 10)
            check(ok, f"{r.label()}: still open 10s after its node was SIGKILLed")

        async def reconnect(old):
            deadline = time.monotonic() + 30
            last = None
            while time.monotonic() < deadline:
                c = Client(old.user, NGINX, seen=old.seen, auto_ack=True)
                c.acked = dict(old.acked)
                started = time.monotonic()
                try:
                    await c.open()
                    return c, started
                except (OSError, WebSocketException, asyncio.TimeoutError, AssertionError) as e:
                    last = e
                    await asyncio.sleep(0.3)
            raise AssertionError(f"{old.user} could not reconnect through nginx within 30s: {last}")

        back = await asyncio.gather(*(reconnect(r) for r in receivers))
        again = [c for c, _ in back]
        log(f"receivers reconnected through nginx {max(t for _, t in back) - killed_at:.1f}s after the kill")
        conv_of = {r.user: dm(s.user, r.user) for s, r in zip(senders, receivers)}
        for p, (c, started) in zip(pumps, back):
            conv = conv_of[c.user]
            want = p.sent_seqs(before=started)
            missing = sorted(want - c.seen.get(conv, set()))
            check(not missing, f"{c.label()}: after `synced`, {len(missing)} of {len(want)} messages answered "
                               f"`sent` before the reconnect are missing: {missing[:10]}")
        # Traffic goes on for a moment, then every `sent` message must arrive.
        await asyncio.sleep(1)
        await asyncio.gather(*(p.finish() for p in pumps))
        for p, c in zip(pumps, again):
            conv = conv_of[c.user]
            check(not p.client.errors, f"{p.client.label()}: errors {p.client.errors[:3]}")
            want = p.sent_seqs()
            await until(lambda: want <= c.seen.get(conv, set()), 10)
            missing = sorted(want - c.seen.get(conv, set()))
            check(not missing, f"{c.user}: {len(missing)} of {len(want)} `sent` messages never arrived: {missing[:10]}")
            for x in (receivers[again.index(c)], c):
                check(not x.disorder, f"{x.label()}: out of order {x.disorder[:5]}")
        log(f"{sum(len(p.sent_seqs()) for p in pumps)} messages `sent`, all received; "
            f"{sum(len(c.backlog) for c in again)} came in the reconnect backlogs")
        # What the victim's own user had `sent` before the kill reaches node 3's
        # user: live, or at the latest on reconnect.
        conv = dm(vs.user, vr.user)
        want = vpump.sent_seqs()
        live = len(want & vr.seen.get(conv, set()))
        await vr.close()
        vr2 = Client(vr.user, NGINX, seen=vr.seen)
        again.append(vr2)
        await vr2.open()
        missing = sorted(want - vr2.seen.get(conv, set()))
        check(not missing, f"{vr.user}: {len(missing)} of {len(want)} messages `sent` on the killed node never "
                           f"arrived: {missing[:10]}")
        check(not vr.disorder and not vr2.disorder, f"out of order: {vr.disorder[:5]} {vr2.disorder[:5]}")
        log(f"the killed node's sender: {len(want)} `sent`, {live} live on node 3, {len(vr2.backlog)} in the backlog")
    finally:
        for p in pumps:
            p.stop.set()
        await close_all(senders + receivers + again + [vs, vr])
        if not alive(pid_of(f"node{victim + 1}")):
            await start_node(victim)
    await wait_cluster(timeout=3 * PEER_BEAT_SECS + 10)


async def redis_outage_during_traffic():
    # Cross-node pairs in every direction, plus one pair on a single node.
    layout = [(0, 1), (1, 2), (2, 0), (0, 0)]
    senders = [Client(u(f"rs{i}"), a) for i, (a, _) in enumerate(layout)]
    receivers = [Client(u(f"rr{i}"), b, auto_ack=True) for i, (_, b) in enumerate(layout)]
    again = []
    pumps = []
    redis_down = False
    try:
        await open_all(senders + receivers)
        convs = [dm(s.user, r.user) for s, r in zip(senders, receivers)]
        pumps = [Pump(s, r.user, f"rd{i}-{RUN}") for i, (s, r) in enumerate(zip(senders, receivers))]
        await until(lambda: all(len(p.sent_seqs()) >= 10 for p in pumps), 10)
        await kill("redis", signal.SIGTERM)
        redis_down = True
        down_at = time.monotonic()
        # The outage lasts at least 3 s, and until every node reports the bus
        # down (at most 15 s); sends go on meanwhile.
        state, bus_down = {}, False

        async def outage_seen():
            nonlocal state, bus_down
            state = await cluster_state()
            bus_down = bus_down or all(bus == 0 for bus, _ in state.values())
            return bus_down and time.monotonic() - down_at >= 3

        await until(outage_seen, 15, 0.25)
        log(f"Redis down for {time.monotonic() - down_at:.1f}s; (bus_up, nodes) per node: {state}")
        mark = down_at + 0.5
        for p in pumps:
            n = len(p.sent_seqs()) - len(p.sent_seqs(before=mark))
            check(n > 0, f"{p.client.label()}: no send answered `sent` while Redis was down "
                         f"(errors {p.client.errors[:3]})")
        # Same-node delivery goes on without the bus.
        same = pumps[3]
        recent = same.sent_seqs() - same.sent_seqs(before=mark)
        ok = await until(lambda: recent <= receivers[3].seen.get(convs[3], set()), 5)
        check(ok, f"same-node pair on node 1: {len(recent - receivers[3].seen.get(convs[3], set()))} messages "
                  "sent during the outage not delivered live")
        await start_redis()
        redis_down = False
        await wait_cluster(timeout=30)
        log(f"bus up again on every node {time.monotonic() - down_at:.1f}s after Redis stopped")
        await asyncio.gather(*(p.finish() for p in pumps))
        # A new cross-node message arrives live on the sessions that lived through the outage.
        for i, (s, r) in enumerate(zip(senders, receivers)):
            check(not s.closed.is_set() and not r.closed.is_set(), f"pair {i}: a session was closed during the outage")
            f = await send_and_wait(s, {"user": r.user}, "after the outage")
            await r.expect(is_msg(convs[i], f["seq"]), f"live delivery after Redis came back (node {layout[i][0] + 1} "
                                                        f"to node {layout[i][1] + 1})", timeout=10)
        # Everything `sent` arrives: live, or in the backlog of a new session.
        live = [len(p.sent_seqs() & r.seen.get(c, set())) for p, r, c in zip(pumps, receivers, convs)]
        await close_all(receivers)
        again = [Client(r.user, r.where, seen=r.seen) for r in receivers]
        await open_all(again)
        for i, (p, c) in enumerate(zip(pumps, again)):
            check(not p.client.errors, f"{p.client.label()}: errors {p.client.errors[:3]}")
            want = p.sent_seqs()
            missing = sorted(want - c.seen.get(convs[i], set()))
            check(not missing, f"{c.label()}: {len(missing)} of {len(want)} `sent` messages neither live nor in "
                               f"the backlog: {missing[:10]}")
            for x in (receivers[i], c):
                check(not x.disorder, f"{x.label()}: out of order {x.disorder[:5]}")
        log(f"sent per pair {[len(p.sent_seqs()) for p in pumps]}, live {live}, "
            f"from the backlog {[len(c.backlog) for c in again]}")
        check(bus_down, f"chat_hub_cluster_bus_up did not drop to 0 on every node while Redis was down: {state}")
    finally:
        for p in pumps:
            p.stop.set()
        await close_all(senders + receivers + again)
        if redis_down or not redis_ping():
            await start_redis()


async def logs_clean():
    bad = []
    for n in range(3):
        path = os.path.join(TMP, f"node{n + 1}.log")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "panicked" in line or "RUST_BACKTRACE" in line:
                    bad.append(f"node{n + 1}: {line.strip()[:200]}")
    check(not bad, f"panics in node logs: {bad[:3]}")
    for n in range(3):
        check(alive(pid_of(f"node{n + 1}")), f"node {n + 1} is not running at the end")


# ---------------------------------------------------------------- main


async def main():
    await run_check("cluster formed: distinct node ids, bus up, every node sees the 2 others", cluster_formed)
    await run_check("direct chat across nodes, both ways, multi-device across nodes", direct_across_nodes)
    await run_check("group via the API over 3 nodes: every member gets every message in seq order; "
                    "group changes through any node reach every node", group_across_nodes)
    await run_check("presence across nodes: online, still online on another node, offline", presence_across_nodes)
    await run_check("presence on connect reports a contact online on another node", presence_on_connect_across_nodes)
    await run_check("disconnect API on node 1 closes sessions on nodes 2 and 3", disconnect_api_across_nodes)
    await run_check(f"presence: users of a SIGKILLed node reported offline within {OFFLINE_AFTER_KILL_SECS}s",
                    presence_after_sigkill)
    await run_check("node SIGKILLed during traffic: its clients reconnect through nginx, nothing `sent` lost",
                    node_killed_during_traffic)
    await run_check("Redis stopped during traffic: sends accepted, nothing `sent` lost, live delivery resumes",
                    redis_outage_during_traffic)
    await run_check("all nodes running, no panics in their logs", logs_clean)


if __name__ == "__main__":
    t0 = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(main(), 540))
    except Exception as e:  # noqa: BLE001
        results.append(("e2e driver", False))
        print(f"FAIL e2e driver: {type(e).__name__}: {e}", flush=True)
    for p in STARTED:
        try:
            p.wait(0)
        except subprocess.TimeoutExpired:
            pass  # still running: run.sh stops it through its pid file
    passed = sum(1 for _, ok in results if ok)
    failed = len(results) - passed
    print(f"e2e client: {passed} checks passed, {failed} failed in {time.monotonic() - t0:.1f}s")
    with open(os.path.join(TMP, "e2e.counts"), "w") as f:
        f.write(f"{passed} {failed}\n")
    sys.exit(1 if failed or not results else 0)
