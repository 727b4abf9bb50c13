#!/usr/bin/env node
// A vfio-irqd client for Node, written from docs/protocol.md alone.
//
// It subscribes to vectors, counts the interrupts that arrive in `irq`
// notifications until every vector has reached --expect, unsubscribes (the
// protocol sends every pending count before that response, so the counts are
// then final) and checks that each total is exactly --expect. Node cannot
// receive file descriptors over a Unix socket, so something else raises the
// interrupts: the test runs `vfio-irqd sim fire` once this client prints its
// "subscribed" line.
//
// Usage: irqd-client.js --socket PATH [--index msix] --expect N [--timeout S] VECTOR...
// Prints one JSON object per line on stdout; exit status 0 when the counts
// are exact, 1 on any failure (the reason on stderr), 2 on bad usage.

import net from "node:net";
import { pathToFileURL } from "node:url";
import { decodeMultiStream, encode } from "@msgpack/msgpack";

const REQUEST = 0;
const RESPONSE = 1;
const NOTIFICATION = 2;
const MAX_MSGID = 0xffffffff;

/** An error response: `[code, message]` from the daemon. */
export class RpcError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

/** A msgpack-RPC connection to vfio-irqd (docs/protocol.md). */
export class IrqdClient {
  /** Connect to the Unix socket at `path`; resolves once connected. */
  static connect(path) {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path });
      socket.once("error", reject);
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(new IrqdClient(socket));
      });
    });
  }

  constructor(socket) {
    this.socket = socket;
    this.nextId = 0;
    this.pending = new Map(); // msgid -> {resolve, reject}
    this.listeners = [];
    this.closed = false;
    this.closeError = null;
    // Notifications may arrive at any time, also between a request and its
    // response, so one reader handles every message in stream order.
    this.done = this.#readLoop();
    socket.on("error", (err) => this.#fail(err));
  }

  async #readLoop() {
    try {
      // The protocol has no length prefix: messages are msgpack values back
      // to back, and decoding finds each one's end.
      for await (const msg of decodeMultiStream(this.socket)) {
        this.#dispatch(msg);
      }
      this.#fail(new Error("the daemon closed the connection"));
    } catch (err) {
      this.#fail(err);
    }
  }

  #dispatch(msg) {
    if (!Array.isArray(msg)) throw new Error(`protocol error: not an array: ${JSON.stringify(msg)}`);
    if (msg[0] === RESPONSE && msg.length === 4) {
      const [, msgid, error, result] = msg;
      const waiter = this.pending.get(msgid);
      if (!waiter) throw new Error(`protocol error: response to unknown msgid ${msgid}`);
      this.pending.delete(msgid);
      if (error === null || error === undefined) waiter.resolve(result);
      else waiter.reject(new RpcError(String(error[0]), String(error[1])));
    } else if (msg[0] === NOTIFICATION && msg.length === 3) {
      for (const listener of this.listeners) listener(msg[1], msg[2]);
    } else {
      throw new Error(`protocol error: unexpected message ${JSON.stringify(msg)}`);
    }
  }

  #fail(err) {
    if (this.closed) return;
    this.closed = true;
    this.closeError = err;
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
    this.socket.destroy();
  }

  /** Call `method` with `params` (an array); resolves to its result or rejects with RpcError. */
  call(method, params = []) {
    if (this.closed) return Promise.reject(this.closeError);
    const msgid = this.nextId;
    this.nextId = msgid === MAX_MSGID ? 0 : msgid + 1;
    return new Promise((resolve, reject) => {
      this.pending.set(msgid, { resolve, reject });
      this.socket.write(encode([REQUEST, msgid, method, params]));
    });
  }

  /** `listener(name, params)` for every notification. */
  onNotification(listener) {
    this.listeners.push(listener);
  }

  close() {
    this.closed = true;
    this.socket.end();
  }
}

function usage(message) {
  process.stderr.write(
    `irqd-client.js: ${message}\n` +
      "usage: irqd-client.js --socket PATH [--index msix] --expect N [--timeout S] VECTOR...\n",
  );
  process.exit(2);
}

function parseArgs(argv) {
  const args = { socket: null, index: "msix", expect: null, timeout: 20, vectors: [] };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === "--socket") args.socket = value();
    else if (arg === "--index") args.index = value();
    else if (arg === "--expect") args.expect = Number.parseInt(value(), 10);
    else if (arg === "--timeout") args.timeout = Number.parseFloat(value());
    else if (/^\d+$/.test(arg)) args.vectors.push(Number.parseInt(arg, 10));
    else usage(`unknown argument ${arg}`);
  }
  if (!args.socket) usage("--socket is required");
  if (!Number.isInteger(args.expect) || args.expect < 1) usage("--expect N (N >= 1) is required");
  if (args.vectors.length === 0) usage("at least one VECTOR is required");
  if (new Set(args.vectors).size !== args.vectors.length) usage("each VECTOR only once");
  return args;
}

function say(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

async function expectError(promise, code, what) {
  try {
    await promise;
  } catch (err) {
    if (err instanceof RpcError && err.code === code) return;
    throw new Error(`${what}: expected ${code}, got ${err.message}`);
  }
  throw new Error(`${what}: expected ${code}, but it succeeded`);
}

async function run(args) {
  const client = await IrqdClient.connect(args.socket);
  const totals = new Map(args.vectors.map((v) => [v, 0]));
  let subscribed = false;
  let reached = null;
  const allReached = new Promise((resolve) => {
    reached = resolve;
  });
  const problems = [];

  client.onNotification((name, params) => {
    if (name !== "irq") return; // unknown notifications must be ignored
    const [index, flat] = params;
    if (index !== args.index) return;
    if (!Array.isArray(flat) || flat.length % 2 !== 0) {
      problems.push(`malformed irq params ${JSON.stringify(params)}`);
      return;
    }
    const seen = new Set();
    for (let i = 0; i < flat.length; i += 2) {
      const [vector, count] = [flat[i], flat[i + 1]];
      if (!totals.has(vector)) problems.push(`irq for vector ${vector}, not subscribed`);
      else if (!(Number.isInteger(count) && count >= 1)) problems.push(`irq count ${count}`);
      else if (seen.has(vector)) problems.push(`vector ${vector} twice in one irq`);
      else totals.set(vector, totals.get(vector) + count);
      seen.add(vector);
    }
    if (subscribed && [...totals.values()].every((n) => n >= args.expect)) reached();
  });

  try {
    // Before hello every request is refused with EPROTO and the connection stays usable.
    await expectError(client.call("device.info", []), "EPROTO", "device.info before hello");
    const hello = await client.call("hello", [{ client: "js-client", protocol: 1 }]);
    if (hello.protocol !== 1) throw new Error(`hello: protocol ${hello.protocol}`);
    const table = hello.device[args.index].count;
    // An error answer leaves the connection usable, and changes nothing.
    await expectError(
      client.call("subscribe", [args.index, [table]]),
      "EINVAL",
      `subscribe to vector ${table} of a ${table}-vector index`,
    );

    const sub = await client.call("subscribe", [args.index, args.vectors]);
    const got = [...sub.vectors].sort((a, b) => a - b);
    const want = [...args.vectors].sort((a, b) => a - b);
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      throw new Error(`subscribe: vectors ${JSON.stringify(sub.vectors)}`);
    }
    subscribed = true;
    say({ event: "subscribed", index: args.index, vectors: sub.vectors, how: sub.how });
    if ([...totals.values()].every((n) => n >= args.expect)) reached();

    let timer = null;
    const timedOut = new Promise((resolve) => {
      timer = setTimeout(() => resolve("timeout"), args.timeout * 1000);
    });
    const outcome = await Promise.race([
      allReached.then(() => "reached"),
      timedOut,
      client.done.then(() => "closed"),
    ]);
    clearTimeout(timer);
    const sofar = JSON.stringify(Object.fromEntries(totals));
    if (outcome === "closed") throw new Error(`${client.closeError.message}; counts ${sofar}`);
    if (outcome === "timeout") throw new Error(`timed out after ${args.timeout} s: ${sofar}`);
    // Pending counts for these vectors are sent before this response: the
    // totals are final once it arrives.
    await client.call("unsubscribe", [args.index, args.vectors]);
    const result = Object.fromEntries(totals);
    if (problems.length > 0) throw new Error(problems.join("; "));
    const wrong = [...totals].filter(([, n]) => n !== args.expect);
    if (wrong.length > 0) {
      throw new Error(`expected ${args.expect} per vector, got ${JSON.stringify(result)}`);
    }
    say({ event: "done", index: args.index, totals: result });
    return 0;
  } finally {
    client.close();
  }
}

// Run as a program, not when imported for IrqdClient.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  run(parseArgs(process.argv.slice(2))).then(
    (status) => process.exit(status),
    (err) => {
      process.stderr.write(`irqd-client.js: FAIL: ${err.message}\n`);
      process.exit(1);
    },
  );
}
