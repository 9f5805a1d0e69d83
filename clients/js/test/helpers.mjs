// Test harness: the real wsbroker daemon (WSBROKER_BIN, default
// ../../target/debug/wsbroker), started with a generated config and a fresh
// self-signed certificate on free ports of 127.0.0.1. Never a mock server.

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { createHmac } from 'node:crypto';
import WS from 'ws';

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.WSBROKER_BIN || resolve(here, '../../../target/debug/wsbroker');
export const ORIGIN = 'http://localhost:3000';

/** How long any single expectation may take. */
export const WAIT_MS = 10000;

export function freePort() {
  return new Promise((res, rej) => {
    const srv = net.createServer();
    srv.on('error', rej);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

function canConnect(port) {
  return new Promise((res) => {
    const s = net.connect({ port, host: '127.0.0.1' });
    s.once('connect', () => {
      s.destroy();
      res(true);
    });
    s.once('error', () => res(false));
  });
}

/** Resolves once cond() is truthy (polling), rejects after timeoutMs. */
export async function waitFor(cond, what, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Rejects when `p` takes longer than timeoutMs. */
export function within(p, what, timeoutMs = WAIT_MS) {
  let t;
  return Promise.race([
    p,
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timed out after ${timeoutMs} ms: ${what}`)), timeoutMs);
    }),
  ]).finally(() => clearTimeout(t));
}

/** A broker daemon: its own temp dir, certificate and ports. */
export class Broker {
  constructor({ extraToml = '', serverToml = '', files = {} } = {}) {
    if (!existsSync(BIN)) throw new Error(`wsbroker binary not found at ${BIN} (run cargo build, or set WSBROKER_BIN)`);
    this.dir = mkdtempSync(join(tmpdir(), 'wsbroker-js-'));
    this.certPath = join(this.dir, 'cert.pem');
    this.keyPath = join(this.dir, 'key.pem');
    execFileSync(
      'openssl',
      [
        'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
        '-days', '1', '-subj', '/CN=localhost',
        '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
        '-addext', 'basicConstraints=critical,CA:FALSE',
        '-keyout', this.keyPath, '-out', this.certPath,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    this.ca = readFileSync(this.certPath);
    for (const [name, content] of Object.entries(files)) writeFileSync(join(this.dir, name), content);
    this.extraToml = extraToml.replaceAll('{dir}', this.dir);
    this.serverToml = serverToml;
    this.child = null;
    this.log = '';
  }

  async start() {
    if (!this.port) {
      this.port = await freePort();
      this.adminPort = await freePort();
      this.configPath = join(this.dir, 'wsbroker.toml');
      writeFileSync(
        this.configPath,
        [
          '[server]',
          `listen = "127.0.0.1:${this.port}"`,
          'shutdown_grace = "1s"',
          this.serverToml,
          '[tls]',
          `cert = "${this.certPath}"`,
          `key = "${this.keyPath}"`,
          '[origins]',
          'allow = ["http://localhost:*", "http://127.0.0.1:*"]',
          '[admin]',
          `listen = "127.0.0.1:${this.adminPort}"`,
          '[log]',
          'level = "warn"',
          this.extraToml,
          '',
        ].join('\n'),
      );
    }
    const child = spawn(BIN, ['serve', '--config', this.configPath], {
      cwd: this.dir,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.child = child;
    child.stderr.on('data', (d) => {
      this.log += d;
    });
    let exited = null;
    child.once('exit', (code, signal) => {
      exited = { code, signal };
    });
    await waitFor(async () => {
      if (exited) throw new Error(`wsbroker exited (${JSON.stringify(exited)}) at start:\n${this.log}`);
      return canConnect(this.port);
    }, `wsbroker listening on ${this.port}`, 20000);
    return this;
  }

  /** SIGTERM (graceful: close 1001 to every client) and wait for the exit. */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const done = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const t = setTimeout(() => child.kill('SIGKILL'), 8000);
    await done;
    clearTimeout(t);
  }

  /** SIGKILL: the clients see an abnormal close (1006). */
  async kill() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const done = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await done;
  }

  async dispose() {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }

  get url() {
    return `wss://127.0.0.1:${this.port}/ws`;
  }

  /**
   * A WebSocket constructor for the client library: the `ws` package with
   * this broker's certificate trusted and an allowed Origin. Every socket it
   * makes is recorded in `sockets` with the time it was created.
   */
  webSocket(origin = ORIGIN) {
    const ca = this.ca;
    const sockets = [];
    class TestWebSocket extends WS {
      constructor(url, protocols) {
        super(url, protocols, { ca, origin });
        sockets.push({ ws: this, at: performance.now(), protocols });
      }
    }
    TestWebSocket.sockets = sockets;
    return TestWebSocket;
  }

  async metrics() {
    const res = await fetch(`http://127.0.0.1:${this.adminPort}/metrics`);
    return res.text();
  }
}

/** Reads one sample (`name{labels}` exactly as rendered) from a metrics text. */
export function metric(text, series) {
  for (const line of text.split('\n')) {
    if (line.startsWith(series + ' ')) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

/** An HS256 JWT signed with `secret`. */
export function mintJwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64(claims);
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** Collects a client's state changes and errors. */
export function record(client) {
  const states = [];
  const errors = [];
  client.on('state', (s) => states.push({ s, at: performance.now() }));
  client.on('error', (e) => errors.push(e));
  return { states, errors, names: () => states.map((x) => x.s) };
}

/** Waits until `client` reports `state` (now or later). */
export function waitState(client, state, timeoutMs = WAIT_MS) {
  if (client.state === state) return Promise.resolve();
  return within(
    new Promise((res) => {
      const off = client.on('state', (s) => {
        if (s === state) {
          off();
          res();
        }
      });
    }),
    `state ${state}`,
    timeoutMs,
  );
}

/** A subscription handler that queues messages, with next() to await one. */
export function inbox() {
  const items = [];
  const waiters = [];
  const handler = (msg) => {
    const w = waiters.shift();
    if (w) w(msg);
    else items.push(msg);
  };
  handler.items = items;
  handler.next = (timeoutMs = WAIT_MS) =>
    within(
      items.length ? Promise.resolve(items.shift()) : new Promise((r) => waiters.push(r)),
      'a message',
      timeoutMs,
    );
  return handler;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
