// chat-hub web client.
//
// Speaks the chat-hub wire protocol, version 1, over one WebSocket. No
// framework and no build step: the server embeds this file as it is. All user
// supplied text (bodies, names, ids) goes into the DOM as text nodes only.

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

const ID_RE = /^[A-Za-z0-9_.@-]{1,64}$/;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const BACKOFF_JITTER = 0.3;           // +-30 %, so reconnecting clients spread out
const TYPING_SEND_EVERY_MS = 3000;    // throttle for our own typing frames
const TYPING_SHOW_MS = 5000;          // a peer's indicator fades this long after their last frame
const HISTORY_PAGE = 50;
const GAP_CHECK_MS = 1000;            // a `sent` may overtake a peer's message; wait before calling it a gap
const RETRY_LATER_MS = 3000;          // for rate_limited / unavailable, which ask us to try again
const IDLE_PING_MS = 25000;           // the server pings us too; this only catches half-dead sockets
const PONG_TIMEOUT_MS = 10000;
const TOKEN_KEY = 'chat-hub.token';

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

// Builds an element. Children that are not nodes become text nodes, which is
// how every piece of user data reaches the page.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const isId = (s) => typeof s === 'string' && ID_RE.test(s);

// Direct conversation keys put the smaller id first (byte order; ids are ASCII).
const dmKey = (a, b) => (a <= b ? `dm:${a}:${b}` : `dm:${b}:${a}`);

function parseConv(key) {
  if (key.startsWith('group:')) return { kind: 'group', group: key.slice(6) };
  if (key.startsWith('dm:')) {
    const [a, b] = key.slice(3).split(':');
    return { kind: 'dm', peer: a === state.me ? b : a };
  }
  return null;
}

function toFor(key) {
  const p = parseConv(key);
  return p.kind === 'group' ? { group: p.group } : { user: p.peer };
}

function randomId(prefix) {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes); // available outside secure contexts, unlike randomUUID
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

// Reads the claims of a JWT without checking it: only to know whom we sign in
// as and when the token runs out. The server does the real check.
function decodeJwt(token) {
  const parts = String(token).trim().split('.');
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}

function fmtTime(ts) {
  if (!ts) return '';
  const d = new Date(ts);
  const sameDay = d.toDateString() === new Date().toDateString();
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  return sameDay ? time : `${d.toLocaleDateString()} ${time}`;
}

function storage(kind) {
  try { return kind === 'local' ? window.localStorage : window.sessionStorage; } catch { return null; }
}
function load(kind, key, fallback) {
  try { const v = storage(kind)?.getItem(key); return v ? JSON.parse(v) : fallback; } catch { return fallback; }
}
function save(kind, key, value) {
  try { storage(kind)?.setItem(key, JSON.stringify(value)); } catch { /* full or disabled: not fatal */ }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

const state = {
  token: null,
  me: null,
  ws: null,
  opened: false,        // the current socket got past the upgrade
  connected: false,     // we have `welcome`
  synced: false,        // we have `synced`: the backlog is in
  attempt: 0,
  failuresBeforeOpen: 0,
  suspectToken: false,  // the server was up while the socket was refused
  reconnectTimer: null,
  retryAt: 0,
  lastFrameAt: 0,
  pingSentAt: 0,
  convs: new Map(),     // conv key -> conversation, see newConv
  groups: new Map(),    // group id -> { name, owner, members: Set }
  presence: new Map(),  // user id -> true/false, as the server told us this session
  outbox: [],           // our messages not yet confirmed by `sent`, oldest first
  refs: new Map(),      // ref -> what we asked, to route replies and errors
  refCounter: 0,
  current: null,        // open conversation key
  typingSentAt: new Map(),
};

function newConv(key) {
  return {
    key,
    msgs: new Map(),          // seq -> message
    // Highest seq up to which we hold every message. null until something
    // tells us where the conversation stands for us (first streamed message,
    // or a complete history). Acks never go past it.
    floor: null,
    ackedThisSession: 0,
    lastAck: 0,               // shown as data-acked, so tests can wait for it
    ackTimer: null,
    gapTimer: null,
    unread: 0,
    last: null,               // { seq, from, body, ts } for the sidebar preview
    history: 'none',          // none | loading | loaded | error
    more: false,
    loadingOlder: false,
    typing: new Map(),        // user -> expiry time
    left: false,              // a group we are no longer in
    name: null,               // group name, kept for the sidebar before `groups` arrives
  };
}

function getConv(key) {
  let c = state.convs.get(key);
  if (!c) {
    c = newConv(key);
    state.convs.set(key, c);
    invalidate('sidebar');
  }
  return c;
}

// The conversation list lives in localStorage per user: the protocol has no
// "list my direct conversations" request, so without this a reload would
// forget every direct chat that has nothing unacknowledged.
const convStoreKey = () => `chat-hub.v1.convs.${state.me}`;
const outboxStoreKey = () => `chat-hub.v1.outbox.${state.me}`;
let persistTimer = null;

function persist() {
  clearTimeout(persistTimer);
  persistTimer = setTimeout(persistNow, 200);
}

function persistNow() {
  clearTimeout(persistTimer);
  persistTimer = null;
  if (!state.me) return;
  const convs = [...state.convs.values()].slice(0, 300).map((c) => ({
    key: c.key, last: c.last, unread: c.unread, left: c.left, name: c.name,
  }));
  save('local', convStoreKey(), { convs });
}

// A reload within the debounce must not lose what was just read.
window.addEventListener('pagehide', () => { if (persistTimer) persistNow(); });

function saveOutbox() {
  if (state.me) save('session', outboxStoreKey(), state.outbox);
}

function restore() {
  const data = load('local', convStoreKey(), { convs: [] });
  for (const s of data.convs || []) {
    if (typeof s.key !== 'string' || !parseConv(s.key)) continue;
    const c = getConv(s.key);
    c.last = s.last || null;
    c.unread = s.unread | 0;
    c.left = !!s.left;
    c.name = s.name || null;
  }
  state.outbox = load('session', outboxStoreKey(), []).filter((m) => m && m.client_id && m.conv);
  for (const m of state.outbox) {
    if (m.status !== 'failed') m.status = 'sending';
    getConv(m.conv);
  }
}

// ---------------------------------------------------------------------------
// Connection: connect, jittered exponential backoff, liveness
// ---------------------------------------------------------------------------

function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws?token=${encodeURIComponent(state.token)}`;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  if (!state.token) return;
  const claims = decodeJwt(state.token);
  if (claims && typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now()) {
    signOut('Your token has expired. Sign in again.');
    return;
  }
  setConnState('connecting');
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  state.opened = false;
  // Handlers ignore a socket we have already given up on.
  ws.onopen = () => { if (ws === state.ws) state.opened = true; };
  ws.onmessage = (ev) => { if (ws === state.ws) onFrame(ev.data); };
  ws.onclose = (ev) => { if (ws === state.ws) onDisconnect(ev); };
  ws.onerror = () => { /* a close event follows */ };
}

function onDisconnect(ev) {
  const wasOpened = state.opened;
  state.ws = null;
  state.opened = false;
  state.connected = false;
  state.synced = false;
  state.pingSentAt = 0;
  // Presence and in-flight requests belong to the old session; the next
  // welcome brings fresh presence frames and we ask again.
  state.presence.clear();
  state.refs.clear();
  for (const c of state.convs.values()) {
    if (c.history === 'loading') c.history = 'none';
    c.loadingOlder = false;
    c.typing.clear();
  }
  invalidate('all');
  if (!state.token) return;
  state.failuresBeforeOpen = wasOpened ? 0 : state.failuresBeforeOpen + 1;
  if (state.failuresBeforeOpen >= 3) checkTokenRejected();
  if (ev && ev.code === 1009) toast('The server closed the connection: a frame was too large.');
  scheduleReconnect();
}

// A browser cannot see why an upgrade was refused. If the server answers
// /healthz but keeps refusing the socket, the token (or our origin) is the
// likely cause, and retrying forever would only hide that.
// Two such checks in a row are needed, so a server that just came back up
// between a failed attempt and the check does not sign us out.
async function checkTokenRejected() {
  let up = false;
  try { up = (await fetch('/healthz', { cache: 'no-store' })).ok; } catch { /* down */ }
  if (!up || state.connected || !state.token) { state.suspectToken = false; return; }
  if (!state.suspectToken) { state.suspectToken = true; return; }
  signOut('The server refused this token (invalid or expired), or this page\u2019s origin is not allowed.');
}

function scheduleReconnect() {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempt);
  const delay = Math.round(base * (1 + BACKOFF_JITTER * (2 * Math.random() - 1)));
  state.attempt = Math.min(state.attempt + 1, 20);
  state.retryAt = Date.now() + delay;
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, delay);
  setConnState('offline');
  showBanner(true);
}

function reconnectNow() {
  if (!state.token || state.connected || (state.ws && !state.opened && state.reconnectTimer === null)) return;
  state.attempt = 0;
  if (state.ws) { const old = state.ws; state.ws = null; try { old.close(); } catch { /* ignore */ } }
  connect();
}

function wsSend(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

function nextRef(prefix, info) {
  const ref = `${prefix}${++state.refCounter}`;
  state.refs.set(ref, info);
  return ref;
}

// Catches sockets that died without a close (sleeping laptop, dropped NAT
// entry): after a quiet spell we ping, and no answer means reconnect.
setInterval(() => {
  if (!state.connected || !state.ws) return;
  const now = Date.now();
  if (state.pingSentAt && now - state.pingSentAt > PONG_TIMEOUT_MS) {
    const dead = state.ws;
    onDisconnect({ code: 4000 });
    try { dead.close(4000, 'no pong'); } catch { /* ignore */ }
  } else if (!state.pingSentAt && now - state.lastFrameAt > IDLE_PING_MS) {
    state.pingSentAt = now;
    wsSend({ type: 'ping' });
  }
}, 5000);

// The countdown in the banner, so a long wait does not look like a hang.
setInterval(() => { if (!$('banner').hidden) renderBanner(); }, 1000);

window.addEventListener('online', reconnectNow);

// ---------------------------------------------------------------------------
// Incoming frames
// ---------------------------------------------------------------------------

function onFrame(data) {
  state.lastFrameAt = Date.now();
  state.pingSentAt = 0;
  let f;
  try { f = JSON.parse(data); } catch { return; }
  if (!f || typeof f.type !== 'string') return;
  switch (f.type) {
    case 'welcome': return onWelcome(f);
    case 'synced': return onSynced();
    case 'message': return onMessage(f);
    case 'sent': return onSent(f);
    case 'history': return onHistory(f);
    case 'typing': return onTyping(f);
    case 'presence': return onPresence(f);
    case 'group': return onGroupEvent(f);
    case 'groups': return onGroups(f);
    case 'error': return onError(f);
    case 'pong': return undefined;
    default: return undefined; // newer server: ignore what we do not know
  }
}

function onWelcome(f) {
  if (f.user && f.user !== state.me) {
    // The token's sub and the server disagree; the server is right.
    state.me = f.user;
    $('me').textContent = f.user;
  }
  state.connected = true;
  state.attempt = 0;
  state.failuresBeforeOpen = 0;
  state.suspectToken = false;
  showBanner(false);
  setConnState('online');
  for (const c of state.convs.values()) c.ackedThisSession = 0;
  wsSend({ type: 'groups', ref: nextRef('gl-', { kind: 'groups' }) });
  // Unconfirmed messages go again with the same client_id; the server
  // answers `sent` with the original seq if it had already stored one.
  for (const m of state.outbox) if (m.status === 'sending') transmit(m);
  const cur = currentConv();
  if (cur && cur.history === 'none') requestHistory(cur, 'initial');
  invalidate('all');
}

function onSynced() {
  state.synced = true;
  setConnState('online');
  // Our other devices may have written here while we were away; their
  // messages are not in our backlog, so refresh the open conversation.
  const cur = currentConv();
  if (cur && cur.history === 'loaded') requestHistory(cur, 'refresh');
  for (const c of state.convs.values()) scheduleAck(c);
}

function onMessage(f) {
  if (typeof f.conv !== 'string' || typeof f.seq !== 'number') return;
  ingest(f, 'live');
}

function onSent(f) {
  const i = state.outbox.findIndex((m) => m.client_id === f.client_id || (f.ref && m.client_id === f.ref));
  const item = i >= 0 ? state.outbox.splice(i, 1)[0] : null;
  saveOutbox();
  if (!item || typeof f.conv !== 'string' || typeof f.seq !== 'number') return;
  ingest({ conv: f.conv, seq: f.seq, from: state.me, to: item.to, body: item.body, ts: f.ts, client_id: item.client_id }, 'sent');
}

// Every message, whatever brought it, goes through here: de-duplication by
// (conv, seq), the ack floor, gap detection, unread counts and the preview.
function ingest(m, source) {
  const c = getConv(m.conv);
  const known = c.msgs.has(m.seq);
  const alreadySeen = known || (c.floor !== null && m.seq <= c.floor);
  if (!known) {
    c.msgs.set(m.seq, { conv: m.conv, seq: m.seq, from: m.from, body: String(m.body ?? ''), ts: m.ts, client_id: m.client_id });
  }
  // A copy of one of our own unconfirmed messages (from a resend) settles it.
  if (m.from === state.me && m.client_id) {
    const i = state.outbox.findIndex((o) => o.client_id === m.client_id);
    if (i >= 0) { state.outbox.splice(i, 1); saveOutbox(); }
  }
  if (source !== 'history') {
    // Streamed messages of a conversation come in seq order starting with the
    // first one we have not acknowledged, so everything before the first one
    // we see was already ours.
    if (c.floor === null) c.floor = m.seq - 1;
    advanceFloor(c);
    if (m.seq > c.floor + 1) scheduleGapCheck(c);
    if (!alreadySeen) {
      if (m.from !== state.me && !isViewing(c.key)) c.unread += 1;
      if (m.from && c.typing.delete(m.from)) invalidate('typing');
    }
    scheduleAck(c, alreadySeen);
  } else {
    advanceFloor(c);
  }
  if (!c.last || m.seq >= (c.last.seq || 0)) {
    c.last = { seq: m.seq, from: m.from, body: String(m.body ?? '').slice(0, 200), ts: m.ts };
  }
  persist();
  invalidate('sidebar');
  if (c.key === state.current) invalidate('messages');
}

function advanceFloor(c) {
  if (c.floor === null) return;
  while (c.msgs.has(c.floor + 1)) c.floor += 1;
}

// A hole between the floor and newer messages (typically messages our other
// devices sent while this one was offline) is filled from history; we never
// ack past it in the meantime.
function scheduleGapCheck(c) {
  if (c.gapTimer) return;
  c.gapTimer = setTimeout(() => {
    c.gapTimer = null;
    if (!state.connected || c.floor === null) return;
    let top = 0;
    for (const s of c.msgs.keys()) if (s > top) top = s;
    let upper = c.floor + 1;
    while (upper < top && !c.msgs.has(upper)) upper += 1;
    if (upper <= c.floor + 1) return;
    const from = c.floor + 1;
    const to = upper - 1;
    requestHistory(c, 'gap', { before: upper, limit: Math.min(200, to - from + 1), from, to });
  }, GAP_CHECK_MS);
}

function scheduleAck(c, force = false) {
  if (force) c.ackedThisSession = 0;
  if (c.ackTimer) return;
  c.ackTimer = setTimeout(() => {
    c.ackTimer = null;
    if (!state.connected || c.floor === null || c.floor < 1 || c.floor <= c.ackedThisSession) return;
    if (wsSend({ type: 'ack', conv: c.key, seq: c.floor })) {
      c.ackedThisSession = c.floor;
      c.lastAck = c.floor;
      invalidate('sidebar');
    }
  }, 150);
}

function requestHistory(c, kind, opts = {}) {
  if (!state.connected) return;
  const frame = { type: 'history', conv: c.key, limit: opts.limit || HISTORY_PAGE };
  if (opts.before) frame.before_seq = opts.before;
  frame.ref = nextRef('h-', { kind, conv: c.key, from: opts.from, to: opts.to });
  if (kind === 'initial') c.history = 'loading';
  if (kind === 'older') c.loadingOlder = true;
  wsSend(frame);
  if (c.key === state.current) invalidate('messages');
}

function onHistory(f) {
  const req = state.refs.get(f.ref) || { kind: 'older', conv: f.conv };
  state.refs.delete(f.ref);
  const c = getConv(f.conv || req.conv);
  const page = Array.isArray(f.messages) ? f.messages.filter((m) => typeof m.seq === 'number') : [];
  const more = !!f.more;
  if (req.kind === 'refresh' && page.length) {
    // If the newest page does not meet what we hold, the part in between is
    // unknown; show the newest page and let scroll-back load the rest.
    let top = 0;
    for (const s of c.msgs.keys()) if (s > top) top = s;
    const lowest = Math.min(...page.map((m) => m.seq));
    if (more && lowest > top + 1) { c.msgs.clear(); c.more = true; }
  }
  for (const m of page) ingest({ ...m, conv: c.key }, 'history');
  if (req.kind === 'initial' || req.kind === 'older') {
    c.more = more;
    if (req.kind === 'initial') c.history = 'loaded';
    c.loadingOlder = false;
    // A complete history tells us where we stand even if nothing was streamed.
    if (!more && c.floor === null && page.length) {
      c.floor = Math.min(...page.map((m) => m.seq)) - 1;
      advanceFloor(c);
    }
  } else if (req.kind === 'gap' && c.floor !== null && c.floor >= req.from - 1) {
    // Whatever history did not return in the hole is not ours to see (e.g.
    // sent while we were out of the group), so the hole is closed either way.
    c.floor = Math.max(c.floor, req.to);
    advanceFloor(c);
  }
  scheduleAck(c);
  if (c.key === state.current) invalidate('messages', req.kind === 'older' ? 'prepend' : null);
}

function onTyping(f) {
  if (!f.conv || !f.from || f.from === state.me) return;
  const c = state.convs.get(f.conv);
  if (!c) return;
  c.typing.set(f.from, Date.now() + TYPING_SHOW_MS);
  setTimeout(() => invalidate('typing'), TYPING_SHOW_MS + 50);
  invalidate('typing');
}

function onPresence(f) {
  if (!isId(f.user)) return;
  state.presence.set(f.user, !!f.online);
  invalidate('sidebar');
  invalidate('header');
}

function upsertGroup(g) {
  const info = { name: g.name || g.group, owner: g.owner, members: new Set(g.members || []) };
  state.groups.set(g.group, info);
  const c = getConv(`group:${g.group}`);
  c.name = info.name;
  c.left = !info.members.has(state.me);
  return c;
}

function onGroups(f) {
  state.refs.delete(f.ref);
  const list = Array.isArray(f.groups) ? f.groups : [];
  const ids = new Set(list.map((g) => g.group));
  for (const g of list) upsertGroup(g);
  // Groups we remember but are no longer in stay readable, but closed.
  for (const c of state.convs.values()) {
    const p = parseConv(c.key);
    if (p.kind === 'group' && !ids.has(p.group)) c.left = true;
  }
  persist();
  invalidate('all');
}

function onGroupEvent(f) {
  const req = f.ref ? state.refs.get(f.ref) : null;
  if (f.ref) state.refs.delete(f.ref);
  const key = `group:${f.group}`;
  const g = state.groups.get(f.group);
  const byOther = f.by && f.by !== state.me;
  switch (f.event) {
    case 'created': {
      if (!(f.members || []).includes(state.me)) break;
      upsertGroup(f);
      if (req && req.kind === 'create') {
        $('group-form').reset();
        $('new-group').open = false;
        openConv(key);
      } else if (byOther) {
        info(`${f.by} added you to the group \u201c${f.name || f.group}\u201d.`);
      }
      break;
    }
    case 'added': {
      if (f.user === state.me) {
        // We lack the member list: ask for it.
        getConv(key).left = false;
        wsSend({ type: 'groups', ref: nextRef('gl-', { kind: 'groups' }) });
        if (byOther) info(`${f.by} added you to the group \u201c${f.group}\u201d.`);
      } else if (g) {
        g.members.add(f.user);
      }
      break;
    }
    case 'removed':
    case 'left': {
      if (f.user === state.me) {
        getConv(key).left = true;
        if (g) g.members.delete(state.me);
        if (f.event === 'removed' && byOther) info(`${f.by} removed you from the group \u201c${g?.name || f.group}\u201d.`);
      } else if (g) {
        g.members.delete(f.user);
      }
      break;
    }
    default:
      break;
  }
  persist();
  invalidate('all');
}

function onError(f) {
  const req = f.ref ? state.refs.get(f.ref) : null;
  if (f.ref) state.refs.delete(f.ref);
  const text = `${f.message || 'Error'} (${f.code || 'error'})`;
  // An error about one of our messages: retry when the server asks us to wait,
  // otherwise mark it failed and let the user decide.
  const item = f.ref ? state.outbox.find((m) => m.client_id === f.ref) : null;
  if (item) {
    if (f.code === 'rate_limited' || f.code === 'unavailable') {
      item.retrying = true;
      setTimeout(() => { item.retrying = false; if (item.status === 'sending') transmit(item); invalidate('messages'); }, RETRY_LATER_MS);
    } else {
      item.status = 'failed';
      item.error = text;
      saveOutbox();
    }
    toast(`Message not sent: ${text}`);
    invalidate('messages');
    return;
  }
  if (req && (req.kind === 'initial' || req.kind === 'older' || req.kind === 'refresh' || req.kind === 'gap')) {
    const c = getConv(req.conv);
    c.loadingOlder = false;
    if (req.kind === 'initial') c.history = 'error';
    if (parseConv(c.key).kind === 'group' && (f.code === 'forbidden' || f.code === 'not_found')) c.left = true;
    invalidate('all');
    if (f.code === 'forbidden' || f.code === 'not_found') return; // shown in the conversation itself
  }
  if (req && req.kind === 'create') {
    const p = $('group-form-error');
    p.textContent = text;
    p.hidden = false;
  }
  toast(text);
}

// ---------------------------------------------------------------------------
// Outgoing actions
// ---------------------------------------------------------------------------

function sendMessage(key, text) {
  const body = text.replace(/\s+$/, '');
  if (!body.trim()) return;
  const c = getConv(key);
  if (c.left) return;
  const item = { client_id: randomId('c-'), conv: key, to: toFor(key), body, ts: Date.now(), status: 'sending' };
  state.outbox.push(item);
  saveOutbox();
  transmit(item);
  state.typingSentAt.delete(key);
  invalidate('messages', 'bottom');
}

function transmit(item) {
  wsSend({ type: 'send', ref: item.client_id, to: item.to, body: item.body, client_id: item.client_id });
}

function sendTyping(key) {
  const now = Date.now();
  if (!state.connected || getConv(key).left) return;
  if (now - (state.typingSentAt.get(key) || 0) < TYPING_SEND_EVERY_MS) return;
  state.typingSentAt.set(key, now);
  wsSend({ type: 'typing', to: toFor(key) });
}

function groupOp(frame, kind) {
  if (!state.connected) { toast('Not connected: try again once reconnected.'); return; }
  wsSend({ ...frame, ref: nextRef('g-', { kind, group: frame.group }) });
}

function startDm(user) {
  if (!isId(user)) {
    toast('A user id is 1 to 64 characters: letters, digits and _ . @ -');
    return false;
  }
  openConv(dmKey(state.me, user));
  return true;
}

function openConv(key) {
  const c = getConv(key);
  state.current = key;
  c.unread = 0;
  persist();
  if (c.history === 'none' || c.history === 'error') requestHistory(c, 'initial');
  document.body.classList.add('conv-open');
  $('group-panel').hidden = true;
  invalidate('all', 'bottom');
  if (window.matchMedia('(min-width: 701px)').matches) $('composer-input').focus();
}

function closeConv() {
  state.current = null;
  document.body.classList.remove('conv-open');
  invalidate('all');
}

const currentConv = () => (state.current ? state.convs.get(state.current) : null);
const isViewing = (key) => key === state.current && document.visibilityState === 'visible';

// ---------------------------------------------------------------------------
// Rendering. Changes mark parts dirty; one microtask later each dirty part is
// rebuilt once, however many frames arrived in between.
// ---------------------------------------------------------------------------

const dirty = new Set();
let scrollHint = null;
let flushQueued = false;

function invalidate(part, hint = null) {
  if (part === 'all') ['sidebar', 'header', 'messages', 'typing'].forEach((p) => dirty.add(p));
  else dirty.add(part);
  if (hint === 'bottom' || (hint === 'prepend' && scrollHint !== 'bottom')) scrollHint = hint;
  if (!flushQueued) {
    flushQueued = true;
    queueMicrotask(flush);
  }
}

function flush() {
  flushQueued = false;
  if (!state.token) { dirty.clear(); return; }
  if (dirty.delete('sidebar')) renderSidebar();
  if (dirty.delete('header')) renderHeader();
  if (dirty.delete('messages')) renderMessages(scrollHint);
  if (dirty.delete('typing')) renderTyping();
  scrollHint = null;
}

function presenceDot(user, testid) {
  const known = state.presence.has(user);
  const online = state.presence.get(user) === true;
  const label = online ? 'online' : known ? 'offline' : 'unknown';
  return el('span', { class: `dot ${online ? 'on' : 'off'}`, 'data-testid': testid, 'data-online': String(online), title: label });
}

function convTitle(c) {
  const p = parseConv(c.key);
  if (p.kind === 'dm') return p.peer === state.me ? `${p.peer} (you)` : p.peer;
  return state.groups.get(p.group)?.name || c.name || p.group;
}

// Lists keep one element per key and are patched and reordered in place, not
// rebuilt: a click or a text selection in progress survives a frame arriving.
function syncList(container, keys, cache, make, patch) {
  const want = new Set(keys);
  for (const [k, node] of cache) if (!want.has(k)) { node.remove(); cache.delete(k); }
  keys.forEach((k, i) => {
    let node = cache.get(k);
    if (!node) { node = make(k); cache.set(k, node); }
    patch(node, k);
    if (container.children[i] !== node) container.insertBefore(node, container.children[i] || null);
  });
}

function setText(node, text) { if (node.textContent !== text) node.textContent = text; }
function setAttr(node, name, value) { if (node.getAttribute(name) !== value) node.setAttribute(name, value); }

function patchDot(dot, user) {
  const online = state.presence.get(user) === true;
  setAttr(dot, 'class', `dot ${online ? 'on' : 'off'}`);
  setAttr(dot, 'data-online', String(online));
  setAttr(dot, 'title', online ? 'online' : state.presence.has(user) ? 'offline' : 'unknown');
}

const convNodes = new Map();

function makeConvItem(key) {
  const dm = parseConv(key).kind === 'dm';
  return el('li', {},
    el('button', { type: 'button', 'data-testid': 'conv-item', 'data-conv': key, onclick: () => openConv(key) },
      dm ? el('span', { class: 'dot', 'data-testid': 'conv-item-presence' }) : el('span', { class: 'group-icon', 'aria-hidden': 'true' }, '#'),
      el('span', { class: 'conv-text' },
        el('span', { class: 'conv-name', 'data-testid': 'conv-name' }),
        el('span', { class: 'conv-preview', 'data-testid': 'conv-preview' })),
      el('span', { class: 'badge', 'data-testid': 'unread', hidden: true })));
}

function patchConvItem(li, key) {
  const c = state.convs.get(key);
  const p = parseConv(key);
  const b = li.firstChild;
  const [icon, text, badge] = b.children;
  setAttr(b, 'class', `conv${key === state.current ? ' active' : ''}${c.left ? ' left' : ''}`);
  setAttr(b, 'data-unread', String(c.unread));
  setAttr(b, 'data-acked', String(c.lastAck));
  if (p.kind === 'dm') patchDot(icon, p.peer);
  setText(text.children[0], convTitle(c));
  setText(text.children[1], c.last
    ? `${c.last.from === state.me ? 'You' : c.last.from}: ${c.last.body}`
    : (p.kind === 'group' ? 'Group' : 'No messages yet'));
  badge.hidden = c.unread <= 0;
  setText(badge, String(c.unread));
}

function renderSidebar() {
  const convs = [...state.convs.values()].sort((a, b) => (b.last?.ts || 0) - (a.last?.ts || 0) || a.key.localeCompare(b.key));
  syncList($('conv-list'), convs.map((c) => c.key), convNodes, makeConvItem, patchConvItem);
  const total = convs.reduce((n, c) => n + c.unread, 0);
  document.title = total ? `(${total}) chat-hub` : 'chat-hub';
}

function renderHeader() {
  const c = currentConv();
  $('empty').hidden = !!c;
  $('conv-header').hidden = !c;
  $('composer').hidden = !c || c.left;
  $('not-member').hidden = !c || !c.left;
  if (!c) { $('group-panel').hidden = true; $('members-toggle').hidden = true; return; }
  const p = parseConv(c.key);
  $('conv-title').textContent = convTitle(c);
  $('conversation').dataset.conv = c.key;
  const dot = $('conv-dot');
  if (p.kind === 'dm') {
    const online = state.presence.get(p.peer) === true;
    dot.hidden = false;
    patchDot(dot, p.peer);
    $('conv-sub').textContent = online ? 'online' : state.presence.has(p.peer) ? 'offline' : '';
    $('members-toggle').hidden = true;
    $('group-panel').hidden = true;
  } else {
    dot.hidden = true;
    const g = state.groups.get(p.group);
    const members = g ? [...g.members] : [];
    const online = members.filter((u) => u !== state.me && state.presence.get(u)).length;
    $('conv-sub').textContent = g ? `${p.group} \u00b7 ${members.length} members \u00b7 ${online} others online` : p.group;
    $('members-toggle').hidden = !g;
    renderGroupPanel(p.group, g, c);
  }
}

function renderGroupPanel(id, g, c) {
  if (!g) return;
  const owner = g.owner === state.me;
  const members = [...g.members].sort((a, b) => (a === g.owner ? -1 : b === g.owner ? 1 : a.localeCompare(b)));
  $('member-list').replaceChildren(...members.map((u) => el('li', { 'data-testid': 'member', 'data-user': u },
    presenceDot(u, 'member-presence'),
    el('span', { class: 'member-name' }, u === state.me ? `${u} (you)` : u),
    u === g.owner ? el('small', { class: 'owner' }, 'owner') : null,
    owner && u !== g.owner && !c.left
      ? el('button', { type: 'button', class: 'link danger', 'data-testid': 'remove-member', 'data-user': u,
        onclick: () => groupOp({ type: 'group_remove', group: id, user: u }, 'remove') }, 'Remove')
      : null)));
  $('add-member').hidden = !owner || c.left;
  $('leave-group').hidden = owner || c.left;
}

function messageEl(m, own, status, item) {
  const showFrom = !own && parseConv(m.conv).kind === 'group';
  return el('div', {
    class: `msg${own ? ' own' : ''} ${status}`,
    'data-testid': 'message',
    'data-seq': m.seq ?? null,
    'data-client-id': m.client_id ?? null,
    'data-from': m.from,
    'data-status': status,
  },
  showFrom ? el('div', { class: 'from', 'data-testid': 'message-from' }, m.from) : null,
  el('div', { class: 'body', 'data-testid': 'message-body' }, m.body),
  el('div', { class: 'meta' },
    el('time', {}, fmtTime(m.ts)),
    own ? el('span', { class: 'status', 'data-testid': 'message-status' },
      status === 'sending' ? (item?.retrying ? 'retrying\u2026' : 'sending\u2026') : status === 'failed' ? `failed: ${item?.error || ''}` : 'sent') : null,
    status === 'failed' ? el('button', { type: 'button', class: 'link', 'data-testid': 'message-retry',
      onclick: () => { item.status = 'sending'; item.error = null; saveOutbox(); transmit(item); invalidate('messages'); } }, 'Retry') : null,
    status === 'failed' ? el('button', { type: 'button', class: 'link', 'data-testid': 'message-discard',
      onclick: () => { state.outbox = state.outbox.filter((o) => o !== item); saveOutbox(); invalidate('messages'); } }, 'Discard') : null));
}

const msgNodes = new Map();   // key -> element, for the open conversation
let msgNodesConv = null;

function renderMessages(hint) {
  const c = currentConv();
  const box = $('messages');
  const list = $('message-list');
  if (!c || msgNodesConv !== c.key) { msgNodes.clear(); list.replaceChildren(); msgNodesConv = c ? c.key : null; }
  if (!c) { $('history-status').textContent = ''; return; }
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const prevTop = box.scrollTop;

  // What each row should show, and a signature to tell when it changed.
  const rows = new Map();
  const stored = [...c.msgs.values()].sort((a, b) => a.seq - b.seq);
  for (const m of stored) {
    const status = m.from === state.me ? 'sent' : 'received';
    rows.set(`s${m.seq}`, { sig: `${status}|${m.ts}|${m.body}`, build: () => messageEl(m, m.from === state.me, status) });
  }
  for (const item of state.outbox) {
    if (item.conv !== c.key) continue;
    rows.set(`c${item.client_id}`, {
      sig: `${item.status}|${item.retrying}|${item.error}`,
      build: () => messageEl({ ...item, from: state.me }, true, item.status, item),
    });
  }
  syncList(list, [...rows.keys()], msgNodes,
    (k) => rows.get(k).build(),
    (node, k) => {
      const row = rows.get(k);
      if (node.dataset.sig === undefined) node.dataset.sig = row.sig;
      if (node.dataset.sig !== row.sig) {
        const fresh = row.build();
        fresh.dataset.sig = row.sig;
        node.replaceWith(fresh);
        msgNodes.set(k, fresh);
      }
    });

  const hs = $('history-status');
  hs.dataset.state = c.history;
  if (c.history === 'loading' || c.loadingOlder) hs.textContent = 'Loading\u2026';
  else if (c.history === 'error') hs.textContent = c.left ? 'History is not available.' : 'Could not load history.';
  else if (c.history === 'loaded' && c.more) hs.textContent = 'Scroll up for older messages';
  else if (c.history === 'loaded') hs.textContent = stored.length ? 'Start of the conversation' : 'No messages yet';
  else hs.textContent = state.connected ? '' : 'Waiting for the connection\u2026';

  if (hint === 'bottom' || (atBottom && hint !== 'prepend')) box.scrollTop = box.scrollHeight;
  else if (hint === 'prepend') box.scrollTop = box.scrollHeight - fromBottom;
  else box.scrollTop = prevTop;

  // Short pages leave nothing to scroll, so no scroll event would ever load more.
  if (c.history === 'loaded' && c.more && !c.loadingOlder && box.scrollHeight <= box.clientHeight + 4) loadOlder(c);
  // What is on screen now counts as delivered.
  scheduleAck(c);
}

function renderTyping() {
  const c = currentConv();
  const now = Date.now();
  let names = [];
  if (c) {
    for (const [u, until] of c.typing) if (until > now) names.push(u); else c.typing.delete(u);
    names = names.sort();
  }
  const t = $('typing');
  t.textContent = names.length === 0 ? ''
    : names.length === 1 ? `${names[0]} is typing\u2026`
      : names.length === 2 ? `${names[0]} and ${names[1]} are typing\u2026`
        : 'Several people are typing\u2026';
}

function loadOlder(c) {
  if (!c.more || c.loadingOlder || c.history !== 'loaded' || !state.connected) return;
  const oldest = Math.min(...c.msgs.keys());
  if (!Number.isFinite(oldest)) return;
  requestHistory(c, 'older', { before: oldest });
}

function setConnState(s) {
  const dot = $('conn-dot');
  dot.dataset.state = s;
  dot.dataset.synced = String(state.synced);
  dot.title = s;
  dot.className = `dot ${s === 'online' ? 'on' : s === 'connecting' ? 'wait' : 'off'}`;
}

function showBanner(on) {
  $('banner').hidden = !on;
  if (on) renderBanner();
}

function renderBanner() {
  const secs = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
  $('banner-text').textContent = state.ws && !state.connected && state.reconnectTimer === null
    ? 'Reconnecting\u2026'
    : `Reconnecting\u2026 next try in ${secs} s`;
}

function toast(text, kind = 'error') {
  const box = $('toasts');
  const t = el('div', { class: `toast ${kind}`, 'data-testid': kind === 'error' ? 'toast' : 'toast-info', role: kind === 'error' ? 'alert' : 'status',
    onclick: () => t.remove() }, text);
  box.append(t);
  while (box.children.length > 4) box.firstChild.remove();
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 5000);
}
const info = (text) => toast(text, 'info');

// ---------------------------------------------------------------------------
// Sign-in and sign-out
// ---------------------------------------------------------------------------

function showLoginError(text) {
  const p = $('login-error');
  p.textContent = text || '';
  p.hidden = !text;
}

function signIn(token, { fromStorage = false } = {}) {
  token = String(token || '').trim();
  const claims = decodeJwt(token);
  if (!claims || !isId(claims.sub)) {
    if (fromStorage) { storage('session')?.removeItem(TOKEN_KEY); showLogin(); }
    showLoginError('That does not look like a chat-hub token.');
    return;
  }
  if (typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now()) {
    storage('session')?.removeItem(TOKEN_KEY);
    showLogin();
    showLoginError('That token has expired.');
    return;
  }
  state.token = token;
  state.me = claims.sub;
  storage('session')?.setItem(TOKEN_KEY, token);
  showLoginError('');
  restore();
  $('me').textContent = state.me;
  $('login').hidden = true;
  $('chat').hidden = false;
  invalidate('all');
  connect();
}

async function devSignIn(user) {
  if (!isId(user)) { showLoginError('A user id is 1 to 64 characters: letters, digits and _ . @ -'); return; }
  let r;
  try {
    r = await fetch('/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) });
  } catch {
    showLoginError('Cannot reach the server.');
    return;
  }
  if (r.status === 404) {
    $('dev-form').hidden = true;
    $('dev-login-off').hidden = false;
    showLoginError('');
    return;
  }
  const body = await r.json().catch(() => null);
  if (!r.ok || !body || typeof body.token !== 'string') {
    showLoginError(body?.message || `Sign-in failed (HTTP ${r.status}).`);
    return;
  }
  signIn(body.token);
}

function signOut(message = '', { forget = false } = {}) {
  if (forget && state.me) {
    storage('local')?.removeItem(convStoreKey());
    storage('session')?.removeItem(outboxStoreKey());
  }
  const ws = state.ws;
  state.token = null;
  state.ws = null;
  if (ws) { try { ws.close(1000, 'sign out'); } catch { /* ignore */ } }
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  for (const c of state.convs.values()) { clearTimeout(c.ackTimer); clearTimeout(c.gapTimer); }
  Object.assign(state, {
    me: null, opened: false, connected: false, synced: false, attempt: 0, failuresBeforeOpen: 0,
    current: null, outbox: [], convs: new Map(), groups: new Map(), presence: new Map(), refs: new Map(),
  });
  state.typingSentAt.clear();
  storage('session')?.removeItem(TOKEN_KEY);
  document.body.classList.remove('conv-open');
  showBanner(false);
  $('conv-list').replaceChildren();
  $('message-list').replaceChildren();
  convNodes.clear();
  msgNodes.clear();
  msgNodesConv = null;
  showLogin();
  showLoginError(message);
}

function showLogin() {
  $('chat').hidden = true;
  $('login').hidden = false;
  $('dev-user').focus();
}

// ---------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------

$('dev-form').addEventListener('submit', (e) => { e.preventDefault(); devSignIn($('dev-user').value.trim()); });
$('token-form').addEventListener('submit', (e) => { e.preventDefault(); signIn($('token-input').value); $('token-input').value = ''; });
$('sign-out').addEventListener('click', () => signOut('', { forget: true }));
$('retry-now').addEventListener('click', reconnectNow);
$('back').addEventListener('click', closeConv);
$('members-toggle').addEventListener('click', () => { $('group-panel').hidden = !$('group-panel').hidden; });

$('new-dm').addEventListener('submit', (e) => {
  e.preventDefault();
  if (startDm($('new-dm-user').value.trim())) $('new-dm-user').value = '';
});

$('group-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const err = $('group-form-error');
  const id = $('group-id').value.trim();
  const name = $('group-name').value.trim() || id;
  const members = [...new Set($('group-members').value.split(/[\s,]+/).filter(Boolean))].filter((u) => u !== state.me);
  const bad = [id, ...members].find((u) => !isId(u));
  if (bad !== undefined) {
    err.textContent = `\u201c${bad}\u201d is not a valid id (1 to 64 characters: letters, digits and _ . @ -).`;
    err.hidden = false;
    return;
  }
  err.hidden = true;
  groupOp({ type: 'group_create', group: id, name, members }, 'create');
});

$('add-member').addEventListener('submit', (e) => {
  e.preventDefault();
  const user = $('add-member-user').value.trim();
  const p = parseConv(state.current || '');
  if (!p || p.kind !== 'group') return;
  if (!isId(user)) { toast('A user id is 1 to 64 characters: letters, digits and _ . @ -'); return; }
  groupOp({ type: 'group_add', group: p.group, user }, 'add');
  $('add-member-user').value = '';
});

$('leave-group').addEventListener('click', () => {
  const p = parseConv(state.current || '');
  if (p && p.kind === 'group') groupOp({ type: 'group_leave', group: p.group }, 'leave');
});

const input = $('composer-input');
$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  if (!state.current) return;
  sendMessage(state.current, input.value);
  input.value = '';
  input.style.height = '';
  input.focus();
});
input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});
input.addEventListener('input', () => {
  input.style.height = '';
  input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  if (state.current && input.value.trim()) sendTyping(state.current);
});

$('messages').addEventListener('scroll', () => {
  const c = currentConv();
  if (c && $('messages').scrollTop < 60) loadOlder(c);
});

// Messages that arrived while the tab was hidden were counted unread; once
// it is visible again the open conversation is read.
document.addEventListener('visibilitychange', () => {
  const c = currentConv();
  if (c && document.visibilityState === 'visible' && c.unread) { c.unread = 0; persist(); invalidate('sidebar'); }
});

// ---------------------------------------------------------------------------
// Start: a token in the URL fragment wins, then one kept for this tab.
// ---------------------------------------------------------------------------

(function boot() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromHash) {
    // Out of the address bar, so it is not bookmarked or shared by accident.
    history.replaceState(null, '', location.pathname + location.search);
    signIn(fromHash);
    if (!state.token) showLogin();
    return;
  }
  const kept = storage('session')?.getItem(TOKEN_KEY);
  if (kept) signIn(kept, { fromStorage: true });
  else showLogin();
})();
