// Type declarations for wsbroker-client (CONTRACT §13).

/** Connection state, reported on 'state'. */
export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A message delivered to a subscription: the concrete topic and the publisher's data. */
export interface Message<T = any> {
  topic: string;
  data: T;
}

/**
 * What the library needs of a WebSocket constructor: the browser's, or the
 * `ws` package's in Node (`import WebSocket from 'ws'`).
 */
export interface WebSocketLike {
  readonly protocol: string;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;

export interface ReconnectOptions {
  /** Lower bound of every reconnect delay (default 250). */
  minDelayMs?: number;
  /** Upper bound of the exponential growth (default 10000). */
  maxDelayMs?: number;
  /** A connection open this long resets the backoff to its first step (default 5000). */
  resetAfterMs?: number;
  /** Source of randomness in [0, 1) for the jitter (default Math.random); for tests. */
  random?: () => number;
}

export interface ClientOptions {
  /**
   * The JWT, or a function returning it (sync or async). A function is called
   * before each connect and before the token's `exp` (refresh). Returning
   * null/undefined/'' means "no token": the connection is anonymous.
   */
  token?: string | null | (() => string | null | undefined | Promise<string | null | undefined>);
  /** Default: globalThis.WebSocket (absent in Node 20: pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
  reconnect?: ReconnectOptions;
  /** How long publish() waits for a connection plus the ack, and subscribe().ready for its ack (default 10000). */
  requestTimeoutMs?: number;
}

/**
 * An error with a machine-readable code: the server's (`bad_request`,
 * `limit`, `forbidden`, `unauthorized`, `internal`) or the library's
 * (`timeout`, `disconnected`, `closed`, `unsubscribed`, `connect_failed`,
 * `token`, `refresh_failed`, `handler`, `bad_frame`).
 */
export class WsbrokerError extends Error {
  constructor(code: string, message: string, extra?: object);
  readonly name: 'WsbrokerError';
  readonly code: string;
  /** The WebSocket close code, on errors caused by a close. */
  readonly closeCode?: number;
  /** The close reason, or the server's reason of an `unsubscribed` frame. */
  readonly reason?: string;
  /** The pattern, on `unsubscribed` and subscription errors reported on 'error'. */
  readonly topic?: string;
  readonly cause?: unknown;
}

export interface Subscription {
  readonly pattern: string;
  /** Resolves on the server's ack; rejects with a WsbrokerError (never unhandled if ignored). */
  readonly ready: Promise<void>;
  /** False once unsubscribed, closed, refused or ended by the server. */
  readonly active: boolean;
  unsubscribe(): void;
}

export class Client {
  constructor(url: string, options?: ClientOptions);
  readonly state: State;
  on(event: 'state', fn: (state: State) => void): () => void;
  on(event: 'error', fn: (error: WsbrokerError) => void): () => void;
  off(event: 'state' | 'error', fn: (arg: any) => void): void;
  subscribe<T = any>(pattern: string, handler: (msg: Message<T>) => void): Subscription;
  /** Resolves on the broker's ack. */
  publish(topic: string, data: Json | unknown): Promise<void>;
  /** No reconnect after this; every pending request is rejected with code 'closed'. */
  close(): void;
}

/** NATS-style matching: `*` is one segment, `>` (last) one or more. */
export function topicMatches(pattern: string, topic: string): boolean;

/** Reconnect delay for attempt n (0-based): uniform in [minDelayMs, min(maxDelayMs, minDelayMs * 2^(n+1))]. */
export function backoffDelay(attempt: number, minDelayMs: number, maxDelayMs: number, random?: () => number): number;

/** The `exp` claim (Unix seconds) of a JWT, read without verification. */
export function tokenExpiry(jwt: string): number | undefined;
