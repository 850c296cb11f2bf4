// Types for ws-gateway.js, the JavaScript client of ws-gateway's /ws rooms protocol.
// Reference: docs/clients.md.

/** A room's position: the epoch of its numbering and the last delivered seq. */
export interface Position {
  /** null when the server has no history (its join acks carry no epoch). */
  epoch: string | null;
  seq: number;
}

export interface ClientOptions {
  /** A static token, sent as the `token` query parameter. */
  token?: string;
  /** Called before connecting, after a 4001 close, and `refreshMargin` before the token's exp. */
  getToken?: () => string | Promise<string>;
  /** ms; bound of the first reconnect delay (full jitter below it). Default 500. */
  backoffInitial?: number;
  /** ms; cap of the reconnect delay bound. Default 20000. */
  backoffMax?: number;
  /** ms; after a 1001/1012 close the reconnect is spread over [0, restartSpread). Default 1000. */
  restartSpread?: number;
  /** ms; after 4002/4003 the reconnect waits longBackoff * (0.5 + 0.5 r). Default 30000. */
  longBackoff?: number;
  /** ms of silence before an application ping; 0 disables pings and the liveness check. Default 20000. */
  pingInterval?: number;
  /** ms; nothing received this long after a ping closes (3008) and reconnects (on time: pingInterval + livenessMargin of silence). Default 10000. */
  livenessMargin?: number;
  /** ms; join/publish/refresh ack deadline. Default 10000. */
  commandTimeout?: number;
  /** ms; refresh this long before the token's exp (at most half its lifetime). Default 30000. */
  refreshMargin?: number;
  /** After a close before open, GET the URL over HTTP to learn 401/403. Default true. */
  preflight?: boolean;
  /** A WebSocket class (default: globalThis.WebSocket). */
  WebSocket?: new (url: string) => WebSocket;
  /** fetch for the pre-flight (default: globalThis.fetch; null disables it). */
  fetch?: ((url: string, init?: object) => Promise<{ status: number }>) | null;
  /** Injected clock and randomness (tests). */
  now?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
  random?: () => number;
}

export type ConnectionState = "disconnected" | "connecting" | "connected";
export type SubscriptionState = "joining" | "joined" | "left";

export interface ErrorInfo {
  /** Stable: a server error code (forbidden, broker_unavailable, ...) or a client one:
   * timeout, unauthorized, forbidden, policy, token, protocol, bad_url. */
  code: string;
  message?: string;
  status?: number;
  room?: string;
}

export interface DisconnectedInfo {
  code: number;
  reason: string;
  /** false: the client stopped (close(), 4004, 401/403); call connect() to start again. */
  reconnect: boolean;
  /** The HTTP status of a refused handshake (401/403), when known. */
  status?: number;
}

export interface Message<T = unknown> {
  room: string;
  data: T;
  /** The publication's number in its room; 0 = unnumbered (delivered, position unchanged). */
  seq: number;
}

export interface JoinedInfo {
  room: string;
  /** true: the missed range follows as ordinary messages. */
  recovered: boolean;
  epoch: string | null;
  /** The room's top seq when the server answered. */
  seq: number | null;
}

export interface ResetInfo {
  room: string;
  epoch: string | null;
  seq: number | null;
  reason: "not_recovered" | "no_position" | "server_reset";
}

export interface ClientEvents {
  connected: Record<string, never>;
  disconnected: DisconnectedInfo;
  error: ErrorInfo;
}

export interface SubscriptionEvents<T = unknown> {
  joined: JoinedInfo;
  message: Message<T>;
  /** History could not cover a gap: reload your state; the position continues from here. */
  reset: ResetInfo;
  left: { room: string; reason: string };
  error: ErrorInfo;
}

export class GatewayError extends Error {
  code: string;
  constructor(code: string, message?: string, details?: object);
}

export class Subscription<T = unknown> {
  readonly room: string;
  readonly state: SubscriptionState;
  /** Last delivered position (null: unknown). Settable: the next (re)join resumes from it. */
  position: Position | null;
  on<K extends keyof SubscriptionEvents<T>>(name: K, fn: (data: SubscriptionEvents<T>[K]) => void): this;
  once<K extends keyof SubscriptionEvents<T>>(name: K, fn: (data: SubscriptionEvents<T>[K]) => void): this;
  off<K extends keyof SubscriptionEvents<T>>(name: K, fn?: (data: SubscriptionEvents<T>[K]) => void): this;
  leave(): void;
}

export interface JoinOptions {
  /** Resume from a stored position (e.g. sessionStorage after a reload). */
  since?: Position;
  /** Without a position: ask for the room's latest publication (latest-value rooms). */
  last?: boolean;
}

export interface PublishOptions {
  /** The gateway publishes a retried request with this key once; the client re-sends it after a reconnect. */
  idempotencyKey?: string;
  /** ms; default the client's commandTimeout. */
  timeout?: number;
}

export class Client {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly subscriptions: Map<string, Subscription>;
  join<T = unknown>(room: string, options?: JoinOptions): Subscription<T>;
  leave(room: string): void;
  /** Resolves with the publication's seq (null from a server that does not number). */
  publish(room: string, data: unknown, options?: PublishOptions): Promise<number | null>;
  /** Stop for good: close (1000) and reject everything pending with code "closed". */
  close(): void;
  /** Start again after a stop (401/403/4004), optionally with a new static token. */
  connect(options?: { token?: string }): void;
  on<K extends keyof ClientEvents>(name: K, fn: (data: ClientEvents[K]) => void): this;
  once<K extends keyof ClientEvents>(name: K, fn: (data: ClientEvents[K]) => void): this;
  off<K extends keyof ClientEvents>(name: K, fn?: (data: ClientEvents[K]) => void): this;
}

/** The `exp` (Unix seconds) of a JWT's payload, or null. */
export function tokenExpiry(token: string): number | null;

export default Client;
