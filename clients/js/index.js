// wsbroker-client: a client for the wsbroker pub/sub broker (CONTRACT §13).
// ESM, no dependencies; browsers and Node >= 20 (pass a WebSocket constructor
// such as the `ws` package's where globalThis.WebSocket is missing).

const SUBPROTOCOL = 'wsbroker.v1';
const BEARER = 'wsbroker.bearer.';

// Close codes after which the client stops instead of reconnecting: only
// a normal close (1000) started by the server, which wsbroker itself never
// sends. 4003 is decided separately (it depends on token()); every other
// code, and an abnormal close, reconnects. Nothing in flight is ever sent
// twice, so a request that made the server close (e.g. 1009, too big) is not
// repeated by the reconnect.
const FINAL_CLOSE_CODES = new Set([1000]);

/** An error carrying a machine-readable `code` (the server's, or one of this library's). */
export class WsbrokerError extends Error {
  constructor(code, message, extra) {
    super(message);
    this.name = 'WsbrokerError';
    this.code = code;
    if (extra) Object.assign(this, extra);
  }
}

/**
 * NATS-style matching of a topic against a pattern: `*` matches exactly one
 * segment, `>` (last segment only) one or more.
 */
export function topicMatches(pattern, topic) {
  const p = pattern.split('.');
  const t = topic.split('.');
  for (let i = 0; i < p.length; i++) {
    if (p[i] === '>') return i === p.length - 1 && t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== '*' && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first after a
 * connection was lost): uniformly random ("full jitter") between
 * `minDelayMs` and `min(maxDelayMs, minDelayMs * 2^(attempt+1))`.
 */
export function backoffDelay(attempt, minDelayMs, maxDelayMs, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** (attempt + 1));
  const floor = Math.min(minDelayMs, ceiling);
  return floor + random() * (ceiling - floor);
}

/** The `exp` claim (Unix seconds) of a compact JWS, read without verifying it; undefined when absent or unreadable. */
export function tokenExpiry(jwt) {
  try {
    const part = String(jwt).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const exp = JSON.parse(new TextDecoder().decode(bytes)).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp : undefined;
  } catch {
    return undefined;
  }
}

function errorMessage(e) {
  return e && e.message ? e.message : String(e);
}

// setTimeout fires at once for delays beyond 2^31-1 ms (about 24.8 days):
// longer (or infinite) request timeouts mean "no timeout", longer backoff
// delays are capped, and far refreshes are re-planned in steps.
const MAX_TIMER_MS = 2 ** 31 - 1;

function timeoutAfter(ms, fn) {
  return ms >= 0 && ms < MAX_TIMER_MS ? setTimeout(fn, ms) : undefined;
}

function rethrowLater(e) {
  setTimeout(() => {
    throw e;
  }, 0);
}

export class Client {
  #url;
  #WebSocket;
  #tokenOption;
  #minDelayMs;
  #maxDelayMs;
  #resetAfterMs;
  #requestTimeoutMs;
  #random;

  #state = 'connecting';
  #closed = false;
  #ws = null; // the current socket (connecting or open), or null
  #open = false;
  #attempt = 0; // reconnect attempts since the last stable connection
  #refreshAttempt = 0;
  #tokenExp; // exp (Unix seconds) of the token the current connection runs on
  #nextId = 0;
  #pending = new Map(); // id -> request sent on the current socket
  #queue = []; // publishes waiting for a connection
  #subs = new Set(); // active local subscriptions
  #listeners = { state: new Set(), error: new Set() };
  #reconnectTimer;
  #stableTimer;
  #refreshTimer;

  /**
   * @param {string} url  wss://host:port/path
   * @param {object} [options]  see index.d.ts
   */
  constructor(url, options = {}) {
    const parsed = new URL(url); // throws on a malformed URL
    if (parsed.protocol !== 'wss:' && parsed.protocol !== 'ws:') {
      throw new TypeError(`wsbroker-client: the URL must be wss:// (or ws://), got ${url}`);
    }
    this.#url = url;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError(
        'wsbroker-client: no WebSocket constructor (Node 20 has none: pass the `ws` package\'s as options.WebSocket)',
      );
    }
    this.#tokenOption = options.token;
    const rc = options.reconnect ?? {};
    this.#minDelayMs = rc.minDelayMs ?? 250;
    this.#maxDelayMs = rc.maxDelayMs ?? 10000;
    this.#resetAfterMs = rc.resetAfterMs ?? 5000;
    this.#random = rc.random ?? Math.random;
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    // Start on the next microtask so that listeners added right after the
    // constructor see the first 'connecting'.
    queueMicrotask(() => this.#connect(true));
  }

  /** 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() {
    return this.#state;
  }

  /** Adds a listener for 'state' or 'error'; returns a function that removes it. */
  on(event, fn) {
    const set = this.#listeners[event];
    if (!set) throw new TypeError(`wsbroker-client: unknown event ${event} (use 'state' or 'error')`);
    set.add(fn);
    return () => set.delete(fn);
  }

  /** Removes a listener added with on(). */
  off(event, fn) {
    this.#listeners[event]?.delete(fn);
  }

  /**
   * Subscribes to a topic pattern. The subscription is kept (and sent again
   * after every reconnect) until unsubscribe(), close(), or the server ends it.
   */
  subscribe(pattern, handler) {
    if (typeof handler !== 'function') throw new TypeError('wsbroker-client: subscribe(pattern, handler) needs a handler function');
    let resolveReady, rejectReady;
    const ready = new Promise((res, rej) => {
      resolveReady = res;
      rejectReady = rej;
    });
    // `ready` may be ignored by the application: never let its rejection be
    // reported as unhandled (awaiting it still throws).
    ready.catch(() => {});
    const sub = {
      pattern: String(pattern),
      handler,
      active: true,
      confirmed: false, // acked on the current connection
      settled: false,
      timer: undefined,
      resolve(v) {
        if (sub.settled) return;
        sub.settled = true;
        clearTimeout(sub.timer);
        resolveReady(v);
      },
      reject(e) {
        if (sub.settled) return false;
        sub.settled = true;
        clearTimeout(sub.timer);
        rejectReady(e);
        return true;
      },
    };
    const api = {
      pattern: sub.pattern,
      ready,
      unsubscribe: () => this.#unsubscribe(sub),
      get active() {
        return sub.active;
      },
    };
    if (this.#closed) {
      sub.active = false;
      sub.reject(new WsbrokerError('closed', 'the client is closed'));
      return api;
    }
    this.#subs.add(sub);
    sub.timer = timeoutAfter(this.#requestTimeoutMs, () => {
      sub.reject(
        new WsbrokerError('timeout', `subscribe ${sub.pattern}: no ack within ${this.#requestTimeoutMs} ms (the subscription stays and is sent on every connect)`),
      );
    });
    if (this.#open) this.#sendSubscribe([sub]);
    return api;
  }

  /** Publishes `data` (any JSON value) to `topic`; resolves on the broker's ack. */
  publish(topic, data) {
    return new Promise((resolve, reject) => {
      if (this.#closed) {
        reject(new WsbrokerError('closed', 'the client is closed'));
        return;
      }
      let body;
      try {
        body = JSON.stringify(data);
      } catch (e) {
        reject(new WsbrokerError('bad_request', `data is not serializable as JSON: ${errorMessage(e)}`));
        return;
      }
      if (body === undefined) {
        reject(new WsbrokerError('bad_request', 'data is not a JSON value'));
        return;
      }
      const prefix = `{"op":"publish","topic":${JSON.stringify(String(topic))},"data":${body},"id":`;
      const req = {
        kind: 'publish',
        frame: (id) => `${prefix}${id}}`,
        onAck: () => resolve(),
        onError: (err) => reject(err),
        timer: undefined,
        id: undefined,
      };
      req.timer = timeoutAfter(this.#requestTimeoutMs, () => {
        this.#dropRequest(req);
        reject(
          new WsbrokerError(
            'timeout',
            req.id === undefined
              ? `publish ${topic}: not connected within ${this.#requestTimeoutMs} ms`
              : `publish ${topic}: no ack within ${this.#requestTimeoutMs} ms`,
          ),
        );
      });
      if (this.#open) this.#send(req);
      else this.#queue.push(req);
    });
  }

  /** Closes the connection for good: no reconnect; every pending request is rejected. */
  close() {
    this.#stop(new WsbrokerError('closed', 'the client is closed'), false);
  }

  // ---- connection --------------------------------------------------------

  #setState(s) {
    if (this.#state === s) return;
    this.#state = s;
    this.#emit('state', s);
  }

  #emit(event, arg) {
    for (const fn of [...this.#listeners[event]]) {
      try {
        fn(arg);
      } catch (e) {
        rethrowLater(e);
      }
    }
  }

  #emitError(err) {
    this.#emit('error', err);
  }

  // token()'s answer; a token() that does not answer within
  // requestTimeoutMs counts as failed (so a hung identity provider cannot
  // stall reconnects or refreshes forever).
  async #getToken() {
    const t = this.#tokenOption;
    if (typeof t !== 'function') return t ? String(t) : null;
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = timeoutAfter(this.#requestTimeoutMs, () =>
        reject(new Error(`token() did not answer within ${this.#requestTimeoutMs} ms`)),
      );
    });
    try {
      const v = await Promise.race([t(), timeout]);
      return v ? String(v) : null;
    } finally {
      clearTimeout(timer);
    }
  }

  async #connect(first = false) {
    if (this.#closed) return;
    if (first) this.#emit('state', 'connecting');
    let token = null;
    if (this.#tokenOption !== undefined) {
      token = await this.#connectToken();
      if (token === undefined) return;
    }
    const protocols = token ? [SUBPROTOCOL, BEARER + token] : [SUBPROTOCOL];
    let ws;
    try {
      ws = new this.#WebSocket(this.#url, protocols);
    } catch (e) {
      this.#emitError(new WsbrokerError('connect_failed', `cannot open ${this.#url}: ${errorMessage(e)}`, { cause: e }));
      this.#scheduleReconnect();
      return;
    }
    this.#ws = ws;
    let failure;
    ws.onopen = () => {
      if (ws === this.#ws) this.#onOpen(ws, token);
    };
    ws.onmessage = (ev) => {
      if (ws === this.#ws) this.#onFrame(ev.data);
    };
    ws.onerror = (ev) => {
      failure = ev && (ev.message || (ev.error && ev.error.message));
    };
    ws.onclose = (ev) => {
      if (ws === this.#ws) this.#onClose(ev.code, ev.reason, failure);
    };
  }

  #onOpen(ws, token) {
    if (ws.protocol !== undefined && ws.protocol !== '' && ws.protocol !== SUBPROTOCOL) {
      // Not a wsbroker (or an incompatible version): treat as a failed attempt.
      this.#emitError(new WsbrokerError('connect_failed', `server selected subprotocol ${ws.protocol}, not ${SUBPROTOCOL}`));
      this.#ws = null;
      ws.close(1000);
      this.#scheduleReconnect();
      return;
    }
    this.#open = true;
    this.#refreshAttempt = 0;
    this.#stableTimer = setTimeout(() => {
      this.#attempt = 0;
    }, Math.min(this.#resetAfterMs, MAX_TIMER_MS));
    this.#setState('open');
    if (this.#closed || ws !== this.#ws) return; // a 'state' listener closed it
    // Every subscription again, one request per distinct pattern.
    const byPattern = new Map();
    for (const sub of this.#subs) {
      const list = byPattern.get(sub.pattern);
      if (list) list.push(sub);
      else byPattern.set(sub.pattern, [sub]);
    }
    for (const subs of byPattern.values()) this.#sendSubscribe(subs);
    // Then what was published while disconnected, in order.
    const queued = this.#queue;
    this.#queue = [];
    for (const req of queued) this.#send(req);
    if (token) {
      this.#tokenExp = tokenExpiry(token);
      this.#scheduleRefresh();
    } else {
      this.#tokenExp = undefined;
    }
  }

  #onClose(code, reason, failure) {
    const wasOpen = this.#open;
    this.#ws = null;
    this.#open = false;
    clearTimeout(this.#stableTimer);
    clearTimeout(this.#refreshTimer);
    for (const sub of this.#subs) sub.confirmed = false;
    // Requests in flight on the lost connection: a publish may or may not
    // have been carried out, so it is rejected (never sent twice); the
    // others are repeated by the next connection anyway.
    const inflight = [...this.#pending.values()];
    this.#pending.clear();
    for (const req of inflight) {
      clearTimeout(req.timer);
      if (req.kind === 'publish') {
        req.onError(
          new WsbrokerError('disconnected', `the connection was lost (${code}) before the ack: the message may or may not have been published`, {
            closeCode: code,
          }),
        );
      }
    }
    if (this.#closed) return;
    if (!wasOpen) {
      this.#emitError(
        new WsbrokerError('connect_failed', `cannot connect to ${this.#url}${failure ? `: ${failure}` : ''} (close ${code})`, {
          closeCode: code,
          reason,
        }),
      );
    }
    if (FINAL_CLOSE_CODES.has(code)) {
      this.#stop(new WsbrokerError('closed', `the server closed the connection: ${code} ${reason || ''}`.trim(), { closeCode: code, reason }), true);
      return;
    }
    if (code === 4003) {
      this.#setState('reconnecting');
      this.#afterAuthRequired(reason);
      return;
    }
    this.#scheduleReconnect();
  }

  // 4003 "authentication required": reconnect only if token() has one now.
  /**
   * The token for the next connection attempt, from `token()`. `undefined`
   * when the client was closed meanwhile, or when `token()` failed: that is
   * reported on `error` and the next attempt is scheduled.
   */
  async #connectToken() {
    try {
      const token = await this.#getToken();
      return this.#closed ? undefined : token;
    } catch (e) {
      if (!this.#closed) {
        this.#emitError(new WsbrokerError('token', `token() failed: ${errorMessage(e)}`, { cause: e }));
        this.#scheduleReconnect();
      }
      return undefined;
    }
  }

  async #afterAuthRequired(reason) {
    const token = this.#tokenOption === undefined ? null : await this.#connectToken();
    if (token === undefined || this.#closed) return;
    if (!token) {
      this.#stop(
        new WsbrokerError('closed', `the server requires authentication (4003 ${reason || ''}) and token() yielded none`.trim(), {
          closeCode: 4003,
          reason,
        }),
        true,
      );
      return;
    }
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    if (this.#closed) return;
    this.#setState('reconnecting');
    const delay = backoffDelay(this.#attempt++, this.#minDelayMs, this.#maxDelayMs, this.#random);
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = setTimeout(() => this.#connect(), Math.min(delay, MAX_TIMER_MS));
  }

  // Ends the client: close() (report = false) or a close code after which
  // reconnecting is pointless (report = true: `err` goes to 'error').
  #stop(err, report) {
    if (this.#closed) return;
    this.#closed = true;
    this.#open = false;
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#stableTimer);
    clearTimeout(this.#refreshTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    const requests = [...this.#pending.values(), ...this.#queue];
    this.#pending.clear();
    this.#queue = [];
    for (const req of requests) {
      clearTimeout(req.timer);
      req.onError(err);
    }
    const subs = [...this.#subs];
    this.#subs.clear();
    for (const sub of subs) {
      sub.active = false;
      sub.reject(err);
    }
    if (report) this.#emitError(err);
    this.#setState('closed');
  }

  // ---- requests ----------------------------------------------------------

  #send(req) {
    const id = ++this.#nextId;
    req.id = id;
    this.#pending.set(id, req);
    try {
      this.#ws.send(req.frame(id));
    } catch (e) {
      // The socket is going away; its close event follows and decides.
      this.#pending.delete(id);
      if (req.kind === 'publish') {
        clearTimeout(req.timer);
        req.onError(new WsbrokerError('disconnected', `send failed: ${errorMessage(e)}`));
      }
    }
  }

  #dropRequest(req) {
    if (req.id !== undefined) this.#pending.delete(req.id);
    const i = this.#queue.indexOf(req);
    if (i >= 0) this.#queue.splice(i, 1);
  }

  #sendSubscribe(subs) {
    const pattern = subs[0].pattern;
    this.#send({
      kind: 'subscribe',
      frame: (id) => JSON.stringify({ op: 'subscribe', topic: pattern, id }),
      onAck: () => {
        for (const sub of subs) {
          if (!sub.active) continue;
          sub.confirmed = true;
          sub.resolve();
        }
      },
      onError: (err) => {
        for (const sub of subs) {
          if (!sub.active) continue;
          this.#endSub(sub);
          // An application that awaited `ready` hears it there; one whose
          // subscription was already running hears it on 'error'.
          if (!sub.reject(err)) this.#emitError(new WsbrokerError(err.code, `subscription ${pattern} ended: ${err.message}`, { topic: pattern }));
        }
      },
      timer: undefined,
    });
  }

  #endSub(sub) {
    sub.active = false;
    sub.confirmed = false;
    this.#subs.delete(sub);
  }

  #unsubscribe(sub) {
    if (!sub.active) return;
    this.#endSub(sub);
    sub.reject(new WsbrokerError('unsubscribed', `unsubscribed from ${sub.pattern} before the ack`));
    for (const other of this.#subs) if (other.pattern === sub.pattern) return; // still wanted
    if (!this.#open) return; // the next connection simply does not send it
    this.#send({
      kind: 'unsubscribe',
      frame: (id) => JSON.stringify({ op: 'unsubscribe', topic: sub.pattern, id }),
      onAck: () => {},
      onError: (err) => this.#emitError(err),
      timer: undefined,
    });
  }

  // ---- token refresh -----------------------------------------------------

  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    if (typeof this.#tokenOption !== 'function' || this.#tokenExp === undefined) return;
    const remaining = this.#tokenExp * 1000 - Date.now();
    // 60 s before exp, or after three quarters of what is left for a short-lived token.
    const delay = Math.max(0, remaining - 60000, remaining * 0.75);
    if (delay >= MAX_TIMER_MS) {
      // A token valid for months: look again later rather than refresh now.
      this.#refreshTimer = setTimeout(() => this.#scheduleRefresh(), MAX_TIMER_MS);
      return;
    }
    this.#refreshTimer = setTimeout(() => this.#refresh(), delay);
  }

  #retryRefresh() {
    clearTimeout(this.#refreshTimer);
    if (!this.#open) return;
    let delay = backoffDelay(this.#refreshAttempt++, this.#minDelayMs, this.#maxDelayMs, this.#random);
    if (this.#tokenExp !== undefined) {
      // Never sleep past the expiry when it is near: halve what is left.
      const remaining = this.#tokenExp * 1000 - Date.now();
      if (remaining > 0) delay = Math.min(delay, Math.max(50, remaining / 2));
    }
    this.#refreshTimer = setTimeout(() => this.#refresh(), Math.min(delay, MAX_TIMER_MS));
  }

  async #refresh() {
    const ws = this.#ws;
    if (!this.#open || !ws) return;
    let token;
    try {
      token = await this.#getToken();
      if (!token) throw new Error('token() yielded no token');
    } catch (e) {
      if (ws !== this.#ws || !this.#open) return;
      this.#emitError(new WsbrokerError('refresh_failed', `token refresh failed: ${errorMessage(e)}`, { cause: e }));
      this.#retryRefresh();
      return;
    }
    if (ws !== this.#ws || !this.#open) return;
    const newExp = tokenExpiry(token);
    if (newExp !== undefined && this.#tokenExp !== undefined && newExp <= this.#tokenExp) {
      // A cached token handed back: sending it would change nothing (and,
      // near the expiry, refresh in a loop). Ask again later.
      this.#emitError(
        new WsbrokerError('refresh_failed', `token refresh failed: token() returned a token expiring no later than the current one (exp ${newExp})`),
      );
      this.#retryRefresh();
      return;
    }
    const req = {
      kind: 'auth',
      frame: (id) => JSON.stringify({ op: 'auth', token, id }),
      onAck: (frame) => {
        if (ws !== this.#ws) return;
        this.#refreshAttempt = 0;
        this.#tokenExp = typeof frame.exp === 'number' ? frame.exp : tokenExpiry(token);
        this.#scheduleRefresh();
      },
      onError: (err) => {
        if (ws !== this.#ws) return;
        this.#emitError(new WsbrokerError(err.code, `token refresh rejected: ${err.message}`));
        this.#retryRefresh();
      },
      timer: undefined,
    };
    req.timer = timeoutAfter(this.#requestTimeoutMs, () => {
      this.#dropRequest(req);
      req.onError(new WsbrokerError('timeout', `no answer to the auth op within ${this.#requestTimeoutMs} ms`));
    });
    this.#send(req);
  }

  // ---- frames from the server -------------------------------------------

  #onFrame(text) {
    let f;
    try {
      f = JSON.parse(typeof text === 'string' ? text : new TextDecoder().decode(text));
    } catch (e) {
      this.#emitError(new WsbrokerError('bad_frame', `unreadable frame from the server: ${errorMessage(e)}`));
      return;
    }
    if (!f || typeof f !== 'object') return;
    switch (f.type) {
      case 'message':
        this.#dispatch(f.topic, f.data);
        return;
      case 'ack':
      case 'error': {
        const req = f.id === undefined ? undefined : this.#pending.get(f.id);
        if (req) {
          this.#pending.delete(f.id);
          clearTimeout(req.timer);
          if (f.type === 'ack') req.onAck(f);
          else req.onError(new WsbrokerError(f.code, f.message ?? f.code));
        } else if (f.type === 'error') {
          this.#emitError(new WsbrokerError(f.code, f.message ?? f.code));
        }
        return;
      }
      case 'unsubscribed': {
        const err = new WsbrokerError('unsubscribed', `the server ended the subscription ${f.topic}: ${f.reason}`, {
          topic: f.topic,
          reason: f.reason,
        });
        for (const sub of [...this.#subs]) {
          if (sub.pattern !== f.topic) continue;
          this.#endSub(sub);
          sub.reject(err);
        }
        this.#emitError(err);
        return;
      }
      default:
        return;
    }
  }

  #dispatch(topic, data) {
    if (typeof topic !== 'string') return;
    for (const sub of [...this.#subs]) {
      if (!sub.confirmed || !sub.active || !topicMatches(sub.pattern, topic)) continue;
      try {
        sub.handler({ topic, data });
      } catch (e) {
        this.#emitError(new WsbrokerError('handler', `the handler of ${sub.pattern} threw: ${errorMessage(e)}`, { cause: e, topic: sub.pattern }));
      }
    }
  }
}
