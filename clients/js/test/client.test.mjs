// The client against the real daemon (auth.mode = "none"): acks, dispatch,
// errors by code, close(), publish while disconnected.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Client, WsbrokerError, topicMatches } from '../index.js';
import { Broker, inbox, record, waitState, within, waitFor, sleep, metric } from './helpers.mjs';

let broker;
before(async () => {
  broker = await new Broker({ extraToml: '[connection]\nmax_subscriptions = 3\n' }).start();
});
after(async () => {
  await broker?.dispose();
});

function client(opts = {}) {
  return new Client(broker.url, { WebSocket: broker.webSocket(), requestTimeoutMs: 5000, ...opts });
}

test('offers wsbroker.v1 (and the bearer token) and the server selects wsbroker.v1', async () => {
  const WebSocket = broker.webSocket();
  const c = new Client(broker.url, { WebSocket, token: 'a.b.c' });
  try {
    await waitState(c, 'open');
    assert.equal(WebSocket.sockets.length, 1);
    const { ws, protocols } = WebSocket.sockets[0];
    assert.deepEqual(protocols, ['wsbroker.v1', 'wsbroker.bearer.a.b.c']);
    assert.equal(ws.protocol, 'wsbroker.v1');
  } finally {
    c.close();
  }
  const anon = client();
  try {
    await waitState(anon, 'open');
  } finally {
    anon.close();
  }
});

test('states: connecting, open, closed; subscribe and publish resolve on their acks', async () => {
  const c = client();
  const rec = record(c);
  try {
    assert.equal(c.state, 'connecting');
    const h = inbox();
    const sub = c.subscribe('acks.*', h);
    assert.equal(await within(sub.ready, 'subscribe ack'), undefined);
    assert.equal(c.state, 'open');
    assert.equal(await c.publish('acks.one', { n: 1, s: 'é' }), undefined);
    assert.deepEqual(await h.next(), { topic: 'acks.one', data: { n: 1, s: 'é' } });
    // Every JSON value goes through.
    for (const data of [null, 0, 'text', [1, [2]], true]) {
      await c.publish('acks.two', data);
      assert.deepEqual(await h.next(), { topic: 'acks.two', data });
    }
  } finally {
    c.close();
  }
  assert.deepEqual(rec.names(), ['connecting', 'open', 'closed']);
  assert.equal(c.state, 'closed');
});

test('two local subscriptions whose patterns both match each get the message once', async () => {
  const c = client();
  const other = client();
  try {
    const a = inbox();
    const b = inbox();
    const c2 = inbox();
    const none = inbox();
    await Promise.all([
      c.subscribe('chat.>', a).ready,
      c.subscribe('chat.room1', b).ready,
      c.subscribe('chat.room1', c2).ready, // the same pattern twice: two handlers
    ]);
    // Three local subscriptions, two patterns: the limit (3) is not reached.
    await c.subscribe('news.*', none).ready;
    await other.publish('chat.room1', { i: 1 });
    await other.publish('chat.room2', { i: 2 });
    assert.deepEqual(await a.next(), { topic: 'chat.room1', data: { i: 1 } });
    assert.deepEqual(await a.next(), { topic: 'chat.room2', data: { i: 2 } });
    assert.deepEqual(await b.next(), { topic: 'chat.room1', data: { i: 1 } });
    assert.deepEqual(await c2.next(), { topic: 'chat.room1', data: { i: 1 } });
    // A marker through the same connection: once it arrives, any duplicate would have too.
    await other.publish('news.x', 'marker');
    assert.deepEqual(await none.next(), { topic: 'news.x', data: 'marker' });
    assert.equal(a.items.length, 0);
    assert.equal(b.items.length, 0);
    assert.equal(c2.items.length, 0);
  } finally {
    c.close();
    other.close();
  }
});

test('unsubscribe stops one handler; the pattern stays while another subscription holds it', async () => {
  const c = client();
  const pub = client();
  try {
    const a = inbox();
    const b = inbox();
    const s1 = c.subscribe('unsub.x', a);
    const s2 = c.subscribe('unsub.x', b);
    await Promise.all([s1.ready, s2.ready]);
    s1.unsubscribe();
    assert.equal(s1.active, false);
    await pub.publish('unsub.x', 1);
    assert.deepEqual(await b.next(), { topic: 'unsub.x', data: 1 });
    s2.unsubscribe();
    // The server no longer sends it: a probe subscription on the same connection sees the marker only.
    const probe = inbox();
    await c.subscribe('unsub.*', probe).ready;
    await pub.publish('unsub.x', 2);
    assert.deepEqual(await probe.next(), { topic: 'unsub.x', data: 2 });
    assert.equal(a.items.length, 0);
    assert.equal(b.items.length, 0);
  } finally {
    c.close();
    pub.close();
  }
});

test('errors carry the server code: bad_request, limit', async () => {
  const c = client();
  const rec = record(c);
  try {
    await assert.rejects(c.publish('chat.*', 1), (e) => e instanceof WsbrokerError && e.code === 'bad_request');
    await assert.rejects(c.publish('bad..topic', 1), { code: 'bad_request' });
    const bad = c.subscribe('chat.>.x', () => {});
    await assert.rejects(bad.ready, { code: 'bad_request', name: 'WsbrokerError' });
    assert.equal(bad.active, false, 'a refused subscription ends');
    // max_subscriptions = 3 per connection
    await Promise.all(['l.1', 'l.2', 'l.3'].map((p) => c.subscribe(p, () => {}).ready));
    const over = c.subscribe('l.4', () => {});
    const err = await over.ready.then(
      () => assert.fail('expected limit'),
      (e) => e,
    );
    assert.ok(err instanceof WsbrokerError);
    assert.equal(err.code, 'limit');
    assert.match(err.message, /\S/);
    // The connection stays usable.
    await c.publish('l.1', 'still open');
    assert.equal(c.state, 'open');
    assert.deepEqual(rec.errors, [], 'request errors are not reported on "error"');
  } finally {
    c.close();
  }
});

test('close() rejects what is pending, ends subscriptions and never reconnects', async () => {
  const WebSocket = broker.webSocket();
  const c = new Client(broker.url, { WebSocket, requestTimeoutMs: 5000 });
  const rec = record(c);
  await waitState(c, 'open');
  const s = c.subscribe('close.x', () => {});
  await s.ready;
  // Sent and not yet acked when close() runs.
  const inflight = c.publish('close.x', 1);
  c.close();
  await assert.rejects(inflight, { code: 'closed' });
  assert.equal(s.active, false);
  assert.equal(c.state, 'closed');
  await assert.rejects(c.publish('close.x', 2), { code: 'closed' });
  await assert.rejects(c.subscribe('close.y', () => {}).ready, { code: 'closed' });
  c.close(); // idempotent
  await sleep(800);
  assert.equal(WebSocket.sockets.length, 1, 'no new connection after close()');
  assert.deepEqual(rec.names(), ['connecting', 'open', 'closed']);

  // close() while the first connection is still being made.
  const W2 = broker.webSocket();
  const early = new Client(broker.url, { WebSocket: W2 });
  const pending = early.publish('close.z', 1);
  const sub = early.subscribe('close.z', () => {});
  early.close();
  await assert.rejects(pending, { code: 'closed' });
  await assert.rejects(sub.ready, { code: 'closed' });
  await sleep(500);
  assert.ok(W2.sockets.length <= 1);
  assert.equal(early.state, 'closed');
});

test('a publish while disconnected waits for the connection, then succeeds', async () => {
  // A daemon of its own that is not running yet.
  const b = new Broker();
  try {
    await b.start();
    await b.kill();
    const c = new Client(b.url, {
      WebSocket: b.webSocket(),
      requestTimeoutMs: 15000,
      reconnect: { minDelayMs: 50, maxDelayMs: 200 },
    });
    const rec = record(c);
    try {
      const h = inbox();
      c.subscribe('wait.x', h);
      const started = performance.now();
      const p = c.publish('wait.x', { queued: true });
      await waitFor(() => rec.names().includes('reconnecting'), 'a failed attempt');
      await sleep(300);
      await b.start();
      await within(p, 'the queued publish is acked', 15000);
      assert.ok(performance.now() - started >= 300);
      // Subscribed before the publish was flushed: its own message arrives.
      assert.deepEqual(await h.next(), { topic: 'wait.x', data: { queued: true } });
      assert.ok(rec.errors.some((e) => e.code === 'connect_failed'), 'failed attempts are reported');
    } finally {
      c.close();
    }
  } finally {
    await b.dispose();
  }
});

test('a publish while disconnected times out after requestTimeoutMs', async () => {
  const b = new Broker();
  try {
    await b.start();
    await b.kill();
    const c = new Client(b.url, {
      WebSocket: b.webSocket(),
      requestTimeoutMs: 600,
      reconnect: { minDelayMs: 50, maxDelayMs: 100 },
    });
    try {
      const started = performance.now();
      await assert.rejects(c.publish('wait.y', 1), (e) => e instanceof WsbrokerError && e.code === 'timeout');
      const took = performance.now() - started;
      assert.ok(took >= 590 && took < 5000, `rejected after ${took} ms`);
      assert.equal(c.state, 'reconnecting');
      // The client still reconnects once the daemon is back.
      await b.start();
      await waitState(c, 'open', 15000);
      await c.publish('wait.y', 2);
    } finally {
      c.close();
    }
  } finally {
    await b.dispose();
  }
});

test('a subscribe whose ack does not come in time rejects ready with timeout, and the subscription stays', async () => {
  const b = new Broker();
  try {
    await b.start();
    await b.kill();
    const c = new Client(b.url, {
      WebSocket: b.webSocket(),
      requestTimeoutMs: 400,
      reconnect: { minDelayMs: 50, maxDelayMs: 100 },
    });
    try {
      const h = inbox();
      const sub = c.subscribe('late.x', h);
      await assert.rejects(sub.ready, { code: 'timeout' });
      assert.equal(sub.active, true);
      await b.start();
      await waitState(c, 'open', 15000);
      // The subscription is sent on connect: publish until it has landed.
      let got;
      await waitFor(async () => {
        await c.publish('late.x', 'eventually');
        got = await h.next(300).catch(() => undefined);
        return got;
      }, 'the late subscription to deliver');
      assert.deepEqual(got, { topic: 'late.x', data: 'eventually' });
    } finally {
      c.close();
    }
  } finally {
    await b.dispose();
  }
});

test('a subscription made while disconnected is sent once connected', async () => {
  const c = client();
  const pub = client();
  try {
    const h = inbox();
    const sub = c.subscribe('early.x', h); // before the first connection opened
    assert.equal(c.state, 'connecting');
    await sub.ready;
    await pub.publish('early.x', 'hello');
    assert.deepEqual(await h.next(), { topic: 'early.x', data: 'hello' });
  } finally {
    c.close();
    pub.close();
  }
});

test('a token() that throws or hangs is reported and retried (mode "none" ignores the token)', async () => {
  let calls = 0;
  const WebSocket = broker.webSocket();
  const c = new Client(broker.url, {
    WebSocket,
    requestTimeoutMs: 300,
    reconnect: { minDelayMs: 50, maxDelayMs: 100 },
    token: () => {
      calls++;
      if (calls === 1) throw new Error('no network');
      if (calls === 2) return new Promise(() => {}); // never answers
      return 'h.p.s';
    },
  });
  const rec = record(c);
  try {
    await waitState(c, 'open', 10000);
    assert.equal(calls, 3);
    const tokenErrors = rec.errors.filter((e) => e.code === 'token');
    assert.equal(tokenErrors.length, 2, rec.errors.map((e) => e.message).join('; '));
    assert.match(tokenErrors[0].message, /no network/);
    assert.match(tokenErrors[1].message, /did not answer/);
    assert.equal(WebSocket.sockets.length, 1, 'no connection attempt without the token');
    assert.deepEqual(WebSocket.sockets[0].protocols, ['wsbroker.v1', 'wsbroker.bearer.h.p.s']);
  } finally {
    c.close();
  }
});

test('far-off expiries and infinite timeouts: no refresh storm, no instant timeout (setTimeout caps at 2^31-1 ms)', async () => {
  let calls = 0;
  const exp = Math.floor(Date.now() / 1000) + 10 * 365 * 86400; // ten years
  const jwt = `e30.${Buffer.from(JSON.stringify({ sub: 'x', exp })).toString('base64url')}.sig`;
  const c = new Client(broker.url, {
    WebSocket: broker.webSocket(),
    requestTimeoutMs: Infinity,
    token: () => {
      calls++;
      return jwt;
    },
  });
  const rec = record(c);
  try {
    const h = inbox();
    await c.subscribe('far.x', h).ready;
    await c.publish('far.x', 1);
    assert.deepEqual(await h.next(), { topic: 'far.x', data: 1 });
    await sleep(500);
    assert.equal(calls, 1, 'token() asked once, no refresh scheduled years early');
    assert.deepEqual(rec.errors, []);
  } finally {
    c.close();
  }
});

test('a token() that keeps returning the same token is not sent again and again: reported, retried with backoff', async () => {
  let calls = 0;
  const exp = Math.floor(Date.now() / 1000) + 2;
  const jwt = `e30.${Buffer.from(JSON.stringify({ sub: 'x', exp })).toString('base64url')}.sig`;
  const c = new Client(broker.url, {
    WebSocket: broker.webSocket(),
    reconnect: { minDelayMs: 200, maxDelayMs: 400 },
    token: () => {
      calls++;
      return jwt;
    },
  });
  const rec = record(c);
  try {
    await waitState(c, 'open');
    // Past the expiry ("none" mode never closes): refreshes are attempted, at the backoff's pace.
    await waitFor(() => Date.now() / 1000 > exp + 1.5, 'past exp', 10000);
    const failed = rec.errors.filter((e) => e.code === 'refresh_failed');
    assert.ok(failed.length >= 2, `refresh attempts reported: ${failed.length}`);
    assert.match(failed[0].message, /no later than the current one/);
    // At most one attempt per 200 ms (minDelayMs) once past exp; a few more before it.
    assert.ok(calls < 40, `token() called ${calls} times in about 3 s`);
    assert.equal(c.state, 'open');
  } finally {
    c.close();
  }
});

test('an exception in a handler is reported on "error" and other handlers still run', async () => {
  const c = client();
  const rec = record(c);
  try {
    const h = inbox();
    await c.subscribe('throw.x', () => {
      throw new Error('boom');
    }).ready;
    await c.subscribe('throw.*', h).ready;
    await c.publish('throw.x', 1);
    assert.deepEqual(await h.next(), { topic: 'throw.x', data: 1 });
    await waitFor(() => rec.errors.length > 0, 'the handler error');
    assert.equal(rec.errors[0].code, 'handler');
    assert.match(rec.errors[0].message, /boom/);
  } finally {
    c.close();
  }
});

test('close() ends the connection on the server (one connection per client)', async () => {
  const before = await broker.metrics();
  const opened = metric(before, 'wsbroker_connections_opened_total');
  const c = client();
  await c.subscribe('m.x', () => {}).ready;
  c.close();
  await waitFor(async () => metric(await broker.metrics(), 'wsbroker_connections_opened_total') === opened + 1, 'one more connection');
  await waitFor(
    async () => metric(await broker.metrics(), 'wsbroker_connections_active') === metric(before, 'wsbroker_connections_active'),
    'the connection closed',
  );
});

test('topicMatches follows NATS wildcards', () => {
  const yes = [
    ['chat.*', 'chat.room1'],
    ['chat.>', 'chat.room1.typing'],
    ['*.room1', 'game.room1'],
    ['chat.*.typing', 'chat.room1.typing'],
    ['>', 'a'],
    ['>', 'a.b.c'],
    ['a.b', 'a.b'],
  ];
  const no = [
    ['chat.*', 'chat'],
    ['chat.*', 'chat.room1.typing'],
    ['chat.>', 'chat'],
    ['*.room1', 'room1'],
    ['*.room1', 'a.b.room1'],
    ['chat.*.typing', 'chat.typing'],
    ['a.b', 'a.b.c'],
    ['a.b.c', 'a.b'],
    ['a.b', 'a.c'],
  ];
  for (const [p, t] of yes) assert.equal(topicMatches(p, t), true, `${p} ~ ${t}`);
  for (const [p, t] of no) assert.equal(topicMatches(p, t), false, `${p} !~ ${t}`);
});

test('the minified size stated in README.md is the measured one (esbuild --minify, within 0.3 kB)', async () => {
  const { build } = await import('esbuild');
  const { gzipSync } = await import('node:zlib');
  const { readFileSync } = await import('node:fs');
  const out = await build({
    entryPoints: [new URL('../index.js', import.meta.url).pathname],
    bundle: true,
    minify: true,
    format: 'esm',
    write: false,
  });
  const code = out.outputFiles[0].contents;
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  const m = readme.match(/\*\*([\d.]+) kB minified, ([\d.]+) kB gzipped\*\*/);
  assert.ok(m, 'README.md states the size as "**N kB minified, M kB gzipped**"');
  const minified = code.length / 1000;
  const gzipped = gzipSync(code, { level: 9 }).length / 1000;
  assert.ok(Math.abs(minified - Number(m[1])) <= 0.3, `minified ${minified} kB, README says ${m[1]}`);
  assert.ok(Math.abs(gzipped - Number(m[2])) <= 0.3, `gzipped ${gzipped} kB, README says ${m[2]}`);
});
