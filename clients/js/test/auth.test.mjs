// Authentication (CONTRACT §10, §13) against the real daemon with
// [auth] mode = "jwt": HS256 tokens minted here with node:crypto, a short
// leeway and auth_timeout. Refresh before expiry on a live connection,
// reconnect after 4001 with a new token, no reconnect after 4003 without
// one, forbidden errors, unsubscribed frames, 401 on the upgrade.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Client, tokenExpiry } from '../index.js';
import { Broker, inbox, record, waitState, waitFor, within, sleep, mintJwt } from './helpers.mjs';

const SECRET = 'js-client-test-secret-0123456789abcdef';
const LEEWAY_S = 1;

let broker;
before(async () => {
  broker = await new Broker({
    files: { secret: `${SECRET}\n` },
    extraToml: [
      '[auth]',
      'mode = "jwt"',
      'hmac_secret_file = "{dir}/secret"',
      `leeway = "${LEEWAY_S}s"`,
      'auth_timeout = "1s"',
    ].join('\n'),
  }).start();
});
after(async () => {
  await broker?.dispose();
});

const nowS = () => Math.floor(Date.now() / 1000);

/** A token for `sub` valid `ttl` seconds, with these subscribe/publish grants. */
function token({ sub = 'u1', ttl = 60, subscribe = ['auth.>'], publish = ['auth.>'], secret = SECRET } = {}) {
  return mintJwt(secret, { sub, exp: nowS() + ttl, wsbroker: { subscribe, publish } });
}

test('tokenExpiry reads exp from the payload (base64url, unverified)', () => {
  const t = mintJwt('k', { sub: 'ü/ß', exp: 1767225600, extra: '>>>???' });
  assert.equal(tokenExpiry(t), 1767225600);
  assert.equal(tokenExpiry(mintJwt('k', { sub: 'x' })), undefined);
  assert.equal(tokenExpiry('not a jwt'), undefined);
  assert.equal(tokenExpiry('a.%%%.c'), undefined);
});

test('a short-lived token is refreshed with the auth op before exp: the connection outlives it', async () => {
  const WebSocket = broker.webSocket();
  let calls = 0;
  const issued = [];
  const c = new Client(broker.url, {
    WebSocket,
    token: async () => {
      calls++;
      const t = token({ ttl: 3 });
      issued.push(tokenExpiry(t));
      return t;
    },
  });
  const rec = record(c);
  try {
    const h = inbox();
    await c.subscribe('auth.refresh', h).ready;
    const firstExp = issued[0];
    // Past the first token's exp + leeway (and some): the server would have
    // closed with 4001 without a refresh.
    await waitFor(() => Date.now() / 1000 > firstExp + LEEWAY_S + 1.5, 'the first token to lapse', 15000);
    assert.ok(calls >= 2, `token() called ${calls} times`);
    await c.publish('auth.refresh', 'still here');
    assert.deepEqual(await h.next(), { topic: 'auth.refresh', data: 'still here' });
    assert.equal(WebSocket.sockets.length, 1, 'never reconnected');
    assert.deepEqual(rec.names(), ['connecting', 'open']);
    assert.deepEqual(rec.errors, []);
  } finally {
    c.close();
  }
});

test('a failed refresh is reported and retried; after 4001 the client reconnects with a new token and resubscribes', async () => {
  const WebSocket = broker.webSocket();
  let phase = 'ok';
  let failures = 0;
  const c = new Client(broker.url, {
    WebSocket,
    reconnect: { minDelayMs: 100, maxDelayMs: 400 },
    token: async () => {
      if (phase === 'ok') return token({ ttl: 2 });
      failures++;
      // First a token the server refuses (bad signature), then no answer at all.
      if (failures === 1) return token({ ttl: 60, secret: 'wrong secret' });
      throw new Error('identity provider unreachable');
    },
  });
  const rec = record(c);
  try {
    const h = inbox();
    await c.subscribe('auth.renew', h).ready;
    const first = WebSocket.sockets[0];
    const closed = new Promise((r) =>
      first.ws.once('close', (code) => {
        phase = 'ok'; // the identity provider is back
        r(code);
      }),
    );
    phase = 'failing';
    assert.equal(await within(closed, 'close 4001', 15000), 4001);
    const codes = rec.errors.map((e) => e.code);
    assert.ok(codes.includes('unauthorized'), `errors: ${codes}`);
    assert.ok(codes.filter((x) => x === 'refresh_failed').length >= 1, `errors: ${codes}`);
    assert.ok(failures >= 2, `refresh retried: ${failures} attempts`);
    await waitFor(() => rec.names().filter((s) => s === 'open').length === 2, 'open again', 15000);
    const second = WebSocket.sockets.at(-1);
    assert.notEqual(second.protocols[1], first.protocols[1], 'a new token on the new connection');
    assert.equal(second.protocols[0], 'wsbroker.v1');
    assert.equal(second.ws.protocol, 'wsbroker.v1');
    phase = 'ok';
    await c.publish('auth.renew', 'after 4001');
    let m;
    do m = await h.next();
    while (m.data !== 'after 4001');
    assert.ok(rec.names().includes('reconnecting'));
  } finally {
    c.close();
  }
});

test('after 4003 the client stops while token() yields nothing', async () => {
  const WebSocket = broker.webSocket();
  let calls = 0;
  const c = new Client(broker.url, {
    WebSocket,
    reconnect: { minDelayMs: 50, maxDelayMs: 100 },
    token: () => {
      calls++;
      return null;
    },
  });
  const rec = record(c);
  const closed = new Promise((r) => {
    const t = setInterval(() => {
      if (WebSocket.sockets[0]) {
        clearInterval(t);
        WebSocket.sockets[0].ws.once('close', (code) => r(code));
      }
    }, 5);
  });
  // Anonymous with no anonymous grants: nothing is permitted meanwhile.
  await assert.rejects(c.publish('auth.x', 1), { code: 'forbidden' });
  assert.equal(await within(closed, 'close 4003'), 4003);
  await waitState(c, 'closed');
  const err = rec.errors.find((e) => e.closeCode === 4003);
  assert.ok(err, `errors: ${rec.errors.map((e) => e.message)}`);
  assert.equal(err.code, 'closed');
  await sleep(600);
  assert.equal(WebSocket.sockets.length, 1, 'no reconnect');
  assert.equal(calls, 2, 'token() asked before connecting and after 4003');
  assert.deepEqual(rec.names(), ['connecting', 'open', 'reconnecting', 'closed']);

  // Without a token option at all: the same.
  const W2 = broker.webSocket();
  const anon = new Client(broker.url, { WebSocket: W2, reconnect: { minDelayMs: 50, maxDelayMs: 100 } });
  await waitState(anon, 'closed', 10000);
  await sleep(400);
  assert.equal(W2.sockets.length, 1);
});

test('after 4003 the client reconnects when token() now has a token', async () => {
  const WebSocket = broker.webSocket();
  let calls = 0;
  const c = new Client(broker.url, {
    WebSocket,
    reconnect: { minDelayMs: 50, maxDelayMs: 100 },
    token: () => (calls++ === 0 ? undefined : token()),
  });
  const rec = record(c);
  try {
    await waitFor(() => rec.names().filter((s) => s === 'open').length === 2, 'open with a token', 10000);
    const h = inbox();
    await c.subscribe('auth.later', h).ready;
    assert.equal(WebSocket.sockets[0].protocols.length, 1, 'first attempt anonymous');
    assert.equal(WebSocket.sockets.at(-1).protocols.length, 2, 'then with the token');
    await c.publish('auth.later', 'in');
    let m;
    do m = await h.next();
    while (m.data !== 'in');
  } finally {
    c.close();
  }
});

test('forbidden subscribe and publish reject with code forbidden; the connection stays', async () => {
  const c = new Client(broker.url, {
    WebSocket: broker.webSocket(),
    token: () => token({ subscribe: ['auth.>'], publish: ['auth.pub'] }),
  });
  const rec = record(c);
  try {
    const bad = c.subscribe('other.>', () => {});
    await assert.rejects(bad.ready, { name: 'WsbrokerError', code: 'forbidden' });
    assert.equal(bad.active, false);
    await assert.rejects(c.publish('auth.other', 1), { code: 'forbidden' });
    await c.publish('auth.pub', 1);
    assert.equal(c.state, 'open');
    assert.deepEqual(rec.errors, []);
  } finally {
    c.close();
  }
});

test('a refresh that narrows the grants: the server ends a subscription with an unsubscribed frame, reported on error', async () => {
  let narrow = false;
  const c = new Client(broker.url, {
    WebSocket: broker.webSocket(),
    token: () => token({ ttl: 3, subscribe: narrow ? ['auth.>'] : ['auth.>', 'wide.>'] }),
  });
  const rec = record(c);
  try {
    const kept = inbox();
    const wide = c.subscribe('wide.>', () => {});
    await wide.ready;
    await c.subscribe('auth.kept', kept).ready;
    narrow = true; // the next refresh (about 2 s from now) carries fewer grants
    await waitFor(() => rec.errors.some((e) => e.code === 'unsubscribed'), 'the unsubscribed report', 15000);
    const e = rec.errors.find((x) => x.code === 'unsubscribed');
    assert.equal(e.topic, 'wide.>');
    assert.equal(e.reason, 'forbidden');
    assert.equal(wide.active, false);
    await c.publish('auth.kept', 'ok');
    assert.deepEqual(await kept.next(), { topic: 'auth.kept', data: 'ok' });
  } finally {
    c.close();
  }
});

test('a token refused at the upgrade (401) is reported; the next attempt asks token() again', async () => {
  const WebSocket = broker.webSocket();
  let calls = 0;
  const c = new Client(broker.url, {
    WebSocket,
    reconnect: { minDelayMs: 50, maxDelayMs: 100 },
    token: () => (calls++ === 0 ? token({ ttl: -120 }) : token()),
  });
  const rec = record(c);
  try {
    await waitState(c, 'open', 10000);
    assert.equal(WebSocket.sockets.length, 2);
    const failed = rec.errors.find((e) => e.code === 'connect_failed');
    assert.ok(failed, 'the refused attempt is reported');
    assert.match(failed.message, /401/);
  } finally {
    c.close();
  }
});
