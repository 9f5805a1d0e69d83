// Reconnects against the real daemon: restarts on the same port (1001 and
// abnormal closes), 1008 and 1009 closes, backoff bounds (unit-level with an
// injected random, and observed between real connection attempts), the reset
// after a stable connection.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Client, backoffDelay } from '../index.js';
import { Broker, inbox, record, waitState, waitFor, within, sleep } from './helpers.mjs';

let broker;
before(async () => {
  broker = await new Broker({
    extraToml: '[connection]\nmax_inbound_rate = 20\n',
  }).start();
});
after(async () => {
  await broker?.dispose();
});

test('backoffDelay: full jitter between minDelayMs and min(maxDelayMs, minDelayMs * 2^(attempt+1))', () => {
  const ceilings = [200, 400, 800, 1600, 1600, 1600];
  ceilings.forEach((ceiling, attempt) => {
    assert.equal(backoffDelay(attempt, 100, 1600, () => 0), 100);
    assert.equal(backoffDelay(attempt, 100, 1600, () => 1), ceiling);
    assert.equal(backoffDelay(attempt, 100, 1600, () => 0.5), 100 + (ceiling - 100) / 2);
  });
  // Huge attempt counts stay capped (no Infinity/NaN).
  assert.equal(backoffDelay(5000, 250, 10000, () => 1), 10000);
  // Math.random stays within the bounds, and does spread.
  const seen = new Set();
  for (let attempt = 0; attempt < 8; attempt++) {
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(attempt, 250, 10000);
      assert.ok(d >= 250 && d <= Math.min(10000, 250 * 2 ** (attempt + 1)), `attempt ${attempt}: ${d}`);
      seen.add(Math.round(d));
    }
  }
  assert.ok(seen.size > 100, 'jitter spreads the delays');
  // maxDelayMs below minDelayMs: maxDelayMs wins.
  assert.equal(backoffDelay(0, 500, 300, () => 0.3), 300);
});

/** Gaps between consecutive connection attempts of a client. */
function gaps(WebSocket) {
  const at = WebSocket.sockets.map((s) => s.at);
  return at.slice(1).map((t, i) => t - at[i]);
}

test('observed delays between attempts follow the backoff (random injected) and reset after a stable connection', async () => {
  const b = new Broker();
  try {
    await b.start();
    await b.kill(); // nothing listens on the port: every attempt fails at once
    const WebSocket = b.webSocket();
    const c = new Client(b.url, {
      WebSocket,
      reconnect: { minDelayMs: 100, maxDelayMs: 800, resetAfterMs: 400, random: () => 1 },
    });
    const rec = record(c);
    try {
      await waitFor(() => WebSocket.sockets.length >= 6, '6 attempts', 15000);
      const expected = [200, 400, 800, 800, 800];
      gaps(WebSocket)
        .slice(0, 5)
        .forEach((g, i) => {
          // setTimeout never fires early (1 ms of rounding aside); late by the
          // refused connection's round trip and a busy machine at most.
          assert.ok(g >= expected[i] - 2 && g < expected[i] + 400, `gap ${i}: ${g} ms, expected ~${expected[i]}`);
        });
      assert.deepEqual([...new Set(rec.names())], ['connecting', 'reconnecting']);
      await b.start();
      await waitState(c, 'open', 15000);
      // Open for longer than resetAfterMs: the next outage starts again at the first step.
      await sleep(700);
      const n = WebSocket.sockets.length;
      const killedAt = performance.now();
      await b.kill();
      await waitFor(() => WebSocket.sockets.length >= n + 2, '2 attempts after the second outage', 15000);
      // Without the reset these would be 800 ms apart (attempts 6 and 7).
      const first = WebSocket.sockets[n].at - killedAt;
      const second = WebSocket.sockets[n + 1].at - WebSocket.sockets[n].at;
      assert.ok(first >= 150 && first < 600, `first attempt after reset: ${first} ms, expected ~200`);
      assert.ok(second >= 398 && second < 800, `second attempt after reset: ${second} ms, expected ~400`);
    } finally {
      c.close();
    }
  } finally {
    await b.dispose();
  }
});

test('observed delays with Math.random stay within [minDelayMs, ceiling]', async () => {
  const b = new Broker();
  try {
    await b.start();
    await b.kill();
    const WebSocket = b.webSocket();
    const c = new Client(b.url, { WebSocket, reconnect: { minDelayMs: 50, maxDelayMs: 400 } });
    try {
      await waitFor(() => WebSocket.sockets.length >= 7, '7 attempts', 15000);
      const ceilings = [100, 200, 400, 400, 400, 400];
      gaps(WebSocket)
        .slice(0, 6)
        .forEach((g, i) => assert.ok(g >= 48 && g < ceilings[i] + 400, `gap ${i}: ${g} ms, bounds [50, ${ceilings[i]}]`));
    } finally {
      c.close();
    }
  } finally {
    await b.dispose();
  }
});

async function restartKeepsSubscription(how) {
  const WebSocket = broker.webSocket();
  const c = new Client(broker.url, { WebSocket, reconnect: { minDelayMs: 100, maxDelayMs: 1000 } });
  const rec = record(c);
  const h = inbox();
  const wild = inbox();
  try {
    await c.subscribe('restart.x', h).ready;
    await c.subscribe('restart.>', wild).ready;
    await c.publish('restart.x', 'before');
    assert.deepEqual(await h.next(), { topic: 'restart.x', data: 'before' });
    assert.deepEqual(await wild.next(), { topic: 'restart.x', data: 'before' });
    const closed = new Promise((r) => WebSocket.sockets[0].ws.once('close', (code) => r(code)));
    if (how === 'sigterm') await broker.stop();
    else await broker.kill();
    const code = await within(closed, 'the close');
    assert.equal(code, how === 'sigterm' ? 1001 : 1006);
    await broker.start();
    await waitFor(() => rec.names().filter((s) => s === 'open').length === 2, 'open again', 15000);
    // Another client publishes: the subscriptions were sent again by the library.
    const pub = new Client(broker.url, { WebSocket: broker.webSocket() });
    try {
      // The re-subscribe may still be on its way: publish until it lands.
      let got;
      await waitFor(async () => {
        await pub.publish('restart.x', 'after');
        got = await h.next(300).catch(() => undefined);
        return got;
      }, 'a message after the restart', 15000);
      assert.deepEqual(got, { topic: 'restart.x', data: 'after' });
      assert.deepEqual((await wild.next()).topic, 'restart.x');
    } finally {
      pub.close();
    }
    assert.deepEqual(rec.names(), ['connecting', 'open', 'reconnecting', 'open']);
    assert.equal(WebSocket.sockets.length >= 2, true);
  } finally {
    c.close();
  }
}

test('a daemon restart on the same port (SIGTERM, close 1001) is a blip: the subscriptions receive afterwards', () =>
  restartKeepsSubscription('sigterm'));

test('a daemon killed and restarted (abnormal close 1006) is a blip too', () => restartKeepsSubscription('sigkill'));

test('reconnects after 1008 (rate limit); the refused publishes reject with limit or disconnected', async () => {
  const WebSocket = broker.webSocket();
  const c = new Client(broker.url, { WebSocket, reconnect: { minDelayMs: 100, maxDelayMs: 500 } });
  const rec = record(c);
  try {
    const h = inbox();
    await c.subscribe('rate.x', h).ready;
    const closed = new Promise((r) => WebSocket.sockets[0].ws.once('close', (code) => r(code)));
    // 200 frames at once against max_inbound_rate = 20 (burst 40).
    const results = await Promise.allSettled(Array.from({ length: 200 }, (_, i) => c.publish('rate.x', i)));
    assert.equal(await within(closed, '1008'), 1008);
    const codes = new Set(results.filter((r) => r.status === 'rejected').map((r) => r.reason.code));
    assert.ok(codes.has('limit'), `codes: ${[...codes]}`);
    assert.deepEqual([...codes].filter((x) => x !== 'limit' && x !== 'disconnected'), []);
    await waitFor(() => rec.names().filter((s) => s === 'open').length === 2, 'reconnected', 15000);
    assert.ok(rec.names().includes('reconnecting'));
    // Drain what arrived before the close, then a fresh message arrives.
    await sleep(200);
    h.items.length = 0;
    await c.publish('rate.x', 'after');
    let m;
    do m = await h.next();
    while (m.data !== 'after');
  } finally {
    c.close();
  }
});

test('reconnects after 1009 (a message too big); the publish that caused it is rejected', async () => {
  const small = new Broker({ serverToml: 'max_message_size = 2048' });
  try {
    await small.start();
    const WebSocket = small.webSocket();
    const c = new Client(small.url, { WebSocket, reconnect: { minDelayMs: 100, maxDelayMs: 500 } });
    const rec = record(c);
    try {
      const h = inbox();
      await c.subscribe('big.x', h).ready;
      const err = await c.publish('big.x', 'x'.repeat(4096)).then(
        () => assert.fail('an oversized publish cannot be acked'),
        (e) => e,
      );
      assert.equal(err.code, 'disconnected');
      assert.equal(err.closeCode, 1009);
      await waitFor(() => rec.names().filter((s) => s === 'open').length === 2, 'reconnected', 15000);
      await c.publish('big.x', 'small');
      assert.deepEqual(await h.next(), { topic: 'big.x', data: 'small' });
    } finally {
      c.close();
    }
  } finally {
    await small.dispose();
  }
});
