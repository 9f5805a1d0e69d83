// The library in headless Chromium: loaded as an ES module from a page on an
// allowed origin (http://localhost:PORT, served by a tiny node http server),
// over wss to the real daemon (its self-signed certificate accepted with
// --ignore-certificate-errors), using the browser's own WebSocket.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { readFileSync, existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { Client } from '../index.js';
import { Broker, inbox, waitFor, mintJwt } from './helpers.mjs';

const SECRET = 'browser-test-secret-0123456789abcdef';
// What a page's backend would hand out: a short-lived token for user "web".
const mint = (ttl = 60) =>
  mintJwt(SECRET, {
    sub: 'web',
    exp: Math.floor(Date.now() / 1000) + ttl,
    wsbroker: { subscribe: ['browser.>'], publish: ['fromBrowser.>'] },
  });

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const LIBRARY = readFileSync(fileURLToPath(new URL('../index.js', import.meta.url)));
// The documented example page, served from its place in the repository.
const EXAMPLE = readFileSync(fileURLToPath(new URL('../../../docs/examples/browser.html', import.meta.url)));

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>wsbroker-client browser test</title>
<script type="module">
  import { Client, WsbrokerError } from './index.js';
  // Record what the library asks of the browser's own WebSocket.
  const Native = globalThis.WebSocket;
  window.sockets = [];
  globalThis.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      window.sockets.push({ socket: this, url, protocols });
    }
  };
  window.wsbroker = { Client, WsbrokerError };
  window.received = [];
  window.states = [];
  window.loaded = true;
</script>
`;

let broker;
let authBroker;
let server;
let otherServer;
let pageOrigin;
let otherOrigin;
let browser;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: apt-get install chromium (or set CHROMIUM)`);
  }
  broker = await new Broker().start();

  const serve = (req, res) => {
    if (req.url === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(PAGE);
    } else if (req.url === '/token') {
      res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
      res.end(mint(3));
    } else if (req.url.startsWith('/docs/examples/browser.html')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(EXAMPLE);
    } else if (req.url === '/index.js' || req.url === '/clients/js/index.js') {
      res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' });
      res.end(LIBRARY);
    } else {
      res.writeHead(404);
      res.end();
    }
  };
  server = http.createServer(serve);
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  pageOrigin = `http://localhost:${server.address().port}`;
  // The same page on a loopback address the broker's allowlist does not hold.
  otherServer = http.createServer(serve);
  await new Promise((r) => otherServer.listen(0, '127.0.0.2', r));
  otherOrigin = `http://127.0.0.2:${otherServer.address().port}`;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // The closed network: no background fetches (they fail, many at a time).
    args: [
      '--ignore-certificate-errors',
      '--host-resolver-rules=MAP localhost 127.0.0.1',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-quic',
      '--no-first-run',
    ],
    timeout: 60000,
  });
});

after(async () => {
  await browser?.close();
  await new Promise((r) => (server ? server.close(r) : r()));
  await new Promise((r) => (otherServer ? otherServer.close(r) : r()));
  await broker?.dispose();
  await authBroker?.dispose();
});

test('in Chromium: the module connects with wsbroker.v1, subscribes, receives and publishes', async () => {
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(String(e)));
  try {
    await page.goto(`${pageOrigin}/`);
    await page.waitForFunction(() => window.loaded === true, null, { timeout: 15000 });
    assert.equal(await page.evaluate(() => location.origin), pageOrigin);

    // The browser subscribes (with a token offered beside wsbroker.v1: ignored in mode "none").
    const subscribed = await page.evaluate(async (url) => {
      const { Client } = window.wsbroker;
      const client = new Client(url, { token: async () => 'e30.e30.sig', requestTimeoutMs: 10000 });
      window.client = client;
      client.on('state', (s) => window.states.push(s));
      const sub = client.subscribe('browser.>', (msg) => window.received.push(msg));
      await sub.ready;
      const s = window.sockets[0];
      return { state: client.state, count: window.sockets.length, offered: s.protocols, selected: s.socket.protocol, url: s.url };
    }, broker.url);
    assert.deepEqual(subscribed, {
      state: 'open',
      count: 1,
      offered: ['wsbroker.v1', 'wsbroker.bearer.e30.e30.sig'],
      selected: 'wsbroker.v1',
      url: broker.url,
    });

    // A Node client publishes; the page receives.
    const node = new Client(broker.url, { WebSocket: broker.webSocket() });
    try {
      await node.publish('browser.in', { from: 'node', n: 1 });
      await page.waitForFunction(() => window.received.length >= 1, null, { timeout: 10000 });
      assert.deepEqual(await page.evaluate(() => window.received), [{ topic: 'browser.in', data: { from: 'node', n: 1 } }]);

      // The page publishes; the Node client receives.
      const h = inbox();
      await node.subscribe('fromBrowser.*', h).ready;
      const ack = await page.evaluate(async () => {
        await window.client.publish('fromBrowser.x', { from: 'browser' });
        return 'acked';
      });
      assert.equal(ack, 'acked');
      assert.deepEqual(await h.next(), { topic: 'fromBrowser.x', data: { from: 'browser' } });

      // An error code from the server reaches the page as a WsbrokerError.
      const err = await page.evaluate(async () => {
        try {
          await window.client.publish('fromBrowser.*', 1);
          return null;
        } catch (e) {
          return { name: e.name, code: e.code, isError: e instanceof window.wsbroker.WsbrokerError };
        }
      });
      assert.deepEqual(err, { name: 'WsbrokerError', code: 'bad_request', isError: true });
    } finally {
      node.close();
    }

    await page.evaluate(() => window.client.close());
    await waitFor(async () => (await page.evaluate(() => window.states)).includes('closed'), 'closed in the page');
    assert.deepEqual(await page.evaluate(() => window.states), ['connecting', 'open', 'closed']);
  } catch (e) {
    e.message += `\npage console:\n${logs.join('\n')}`;
    throw e;
  } finally {
    await page.close();
  }
});

test('in Chromium: the example page docs/examples/browser.html subscribes and publishes', async () => {
  const page = await browser.newPage();
  try {
    await page.goto(`${pageOrigin}/docs/examples/browser.html?url=${encodeURIComponent(broker.url)}`);
    await page.waitForFunction(() => document.getElementById('state').textContent === 'open', null, { timeout: 15000 });
    await page.click('#subscribe button');
    await page.waitForFunction(() => document.getElementById('log').textContent.includes('subscribed to chat.>'), null, { timeout: 10000 });
    await page.click('#publish button');
    await page.waitForFunction(
      () => document.getElementById('log').textContent.includes('message on chat.room1: {"text":"hi"}'),
      null,
      { timeout: 10000 },
    );
    const log = await page.evaluate(() => document.getElementById('log').textContent);
    assert.match(log, /published to chat\.room1/);
    assert.doesNotMatch(log, /error|failed/);
  } finally {
    await page.close();
  }
});

test('in Chromium: a page on an origin the broker does not allow never opens', async () => {
  // 127.0.0.2 is loopback too, but http://127.0.0.2:PORT is not in the allowlist.
  const page = await browser.newPage();
  try {
    await page.goto(`${otherOrigin}/`);
    await page.waitForFunction(() => window.loaded === true, null, { timeout: 15000 });
    const r = await page.evaluate(async (url) => {
      const client = new window.wsbroker.Client(url, { requestTimeoutMs: 1500 });
      const errors = [];
      client.on('error', (e) => errors.push(e.code));
      try {
        await client.publish('x.y', 1);
        return { acked: true, errors };
      } catch (e) {
        return { acked: false, code: e.code, errors, state: client.state };
      } finally {
        client.close();
      }
    }, broker.url);
    assert.equal(r.acked, false);
    assert.equal(r.code, 'timeout');
    assert.ok(r.errors.includes('connect_failed'));
  } finally {
    await page.close();
  }
});

test('in Chromium with [auth] mode = "jwt": token() fetched by the page, refreshed before exp, forbidden by code', async () => {
  // A daemon of its own (started here, so that the tests above do not depend on it).
  authBroker = await new Broker({
    files: { secret: SECRET },
    extraToml: '[auth]\nmode = "jwt"\nhmac_secret_file = "{dir}/secret"\nleeway = "1s"\nauth_timeout = "2s"',
  }).start();
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(String(e)));
  try {
    await page.goto(`${pageOrigin}/`);
    await page.waitForFunction(() => window.loaded === true, null, { timeout: 15000 });
    const r = await page.evaluate(async (url) => {
      const { Client } = window.wsbroker;
      window.tokenCalls = 0;
      const client = new Client(url, {
        // The page's backend hands out 3-second tokens.
        token: async () => {
          window.tokenCalls++;
          return (await fetch('/token')).text();
        },
      });
      window.client = client;
      window.errors = [];
      client.on('error', (e) => window.errors.push(e.code));
      client.on('state', (s) => window.states.push(s));
      await client.subscribe('browser.>', (msg) => window.received.push(msg)).ready;
      let forbidden;
      try {
        await client.subscribe('elsewhere.>', () => {}).ready;
      } catch (e) {
        forbidden = e.code;
      }
      let publishForbidden;
      try {
        await client.publish('browser.x', 1);
      } catch (e) {
        publishForbidden = e.code;
      }
      return { forbidden, publishForbidden, offered: window.sockets.at(-1).protocols.length };
    }, authBroker.url);
    assert.deepEqual(r, { forbidden: 'forbidden', publishForbidden: 'forbidden', offered: 2 });

    // Outlive the first 3-second token (+ 1 s leeway): refreshed in place.
    await new Promise((res) => setTimeout(res, 5000));
    const node = new Client(authBroker.url, {
      WebSocket: authBroker.webSocket(),
      token: () => mintJwt(SECRET, { sub: 'svc', exp: Math.floor(Date.now() / 1000) + 60, wsbroker: { publish: ['browser.>'], subscribe: ['fromBrowser.>'] } }),
    });
    try {
      await node.publish('browser.in', { n: 2 });
      await page.waitForFunction(() => window.received.length >= 1, null, { timeout: 10000 });
      assert.deepEqual(await page.evaluate(() => window.received), [{ topic: 'browser.in', data: { n: 2 } }]);
      const h = inbox();
      await node.subscribe('fromBrowser.>', h).ready;
      await page.evaluate(() => window.client.publish('fromBrowser.y', 'hi'));
      assert.deepEqual(await h.next(), { topic: 'fromBrowser.y', data: 'hi' });
    } finally {
      node.close();
    }
    const after = await page.evaluate(() => ({ calls: window.tokenCalls, states: window.states, errors: window.errors }));
    assert.ok(after.calls >= 2, `token() called ${after.calls} times`);
    assert.deepEqual(after.states, ['connecting', 'open'], 'never reconnected');
    assert.deepEqual(after.errors, []);
    await page.evaluate(() => window.client.close());
  } catch (e) {
    e.message += `\npage console:\n${logs.join('\n')}`;
    throw e;
  } finally {
    await page.close();
  }
});
