"use strict";
// Shared helpers of the interop scripts: bounded waits, checks that print one JSON line each,
// and HS256 tokens signed with the interop app's key (so a script can mint expired or
// wrongly signed tokens without a server round trip).

const util = require("node:util");
const crypto = require("node:crypto");
const signalR = require("@microsoft/signalr");

const WAIT_MS = 8000; // bounded wait for one expected event
const CHECK_TIMEOUT_MS = 25000; // hard bound per check
const NAME_IDENTIFIER = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier";
const JWT_KEY = process.env.INTEROP_JWT_KEY || "hubwire-interop-test-key-0123456789abcdef";

class CheckFailed extends Error {}

function show(value) {
  return util.inspect(value, { depth: 6, breakLength: Infinity });
}

function eq(actual, expected, what) {
  if (!util.isDeepStrictEqual(actual, expected)) {
    throw new CheckFailed(`${what}: expected ${show(expected)}, got ${show(actual)}`);
  }
}

function ok(condition, what) {
  if (!condition) throw new CheckFailed(what);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new CheckFailed(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Awaits a promise that must reject; returns the rejection's message. */
async function rejectionOf(promise, what, ms = WAIT_MS) {
  let value;
  try {
    value = await withTimeout(promise, ms, what);
  } catch (err) {
    if (err instanceof CheckFailed) throw err;
    return err && err.message !== undefined ? err.message : String(err);
  }
  throw new CheckFailed(`${what}: expected an error, got ${show(value)}`);
}

/** A promise plus its resolve function (for events). */
function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

function makeToken(lifetimeSeconds, key = JWT_KEY) {
  const now = Math.floor(Date.now() / 1000);
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const header = part({ alg: "HS256", typ: "JWT" });
  const payload = part({ [NAME_IDENTIFIER]: "testuser", nbf: now - 300, exp: now + lifetimeSeconds });
  const signature = crypto.createHmac("sha256", key).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

function stderrLogger(prefix) {
  return {
    log(level, message) {
      if (level >= signalR.LogLevel.Error) {
        process.stderr.write(`[${prefix}] ${signalR.LogLevel[level]}: ${message}\n`);
      }
    },
  };
}

/**
 * Runs named checks one after another, printing `{"name", "ok", "detail"}` per check.
 * `cleanup` callbacks registered by a check run after it (connections are always stopped).
 */
async function runChecks(checks, only) {
  const selected = only.length ? checks.filter(([name]) => only.includes(name)) : checks;
  for (const [name, body] of selected) {
    const cleanups = [];
    const started = Date.now();
    let result;
    try {
      await withTimeout(body({ cleanup: (fn) => cleanups.push(fn) }), CHECK_TIMEOUT_MS, name);
      result = { name, ok: true, detail: "" };
    } catch (err) {
      result = { name, ok: false, detail: err instanceof CheckFailed ? err.message : (err && err.stack) || String(err) };
    }
    for (const fn of cleanups.reverse()) {
      try {
        await withTimeout(Promise.resolve().then(fn), WAIT_MS, `cleanup of ${name}`);
      } catch (err) {
        // a connection that cannot be stopped fails the check (it is never swallowed)
        const why = `cleanup failed: ${(err && err.message) || err}`;
        result = { name, ok: false, detail: result.ok ? why : `${result.detail}; ${why}` };
      }
    }
    result.ms = Date.now() - started;
    process.stdout.write(`${JSON.stringify(result)}\n`);
  }
}

/** An HttpClient that records every request (method, url, status) and passes it on. */
class RecordingHttpClient extends signalR.HttpClient {
  constructor(logger) {
    super();
    this.inner = new signalR.DefaultHttpClient(logger);
    this.requests = [];
  }

  async send(request) {
    const entry = { method: request.method, url: request.url, status: null };
    this.requests.push(entry);
    try {
      const response = await this.inner.send(request);
      entry.status = response.statusCode;
      return response;
    } catch (err) {
      entry.status = err && err.statusCode !== undefined ? err.statusCode : `error: ${err && err.name}`;
      throw err;
    }
  }

  getCookieString(url) {
    return this.inner.getCookieString(url);
  }
}

module.exports = {
  CheckFailed,
  JWT_KEY,
  RecordingHttpClient,
  WAIT_MS,
  deferred,
  eq,
  makeToken,
  ok,
  rejectionOf,
  runChecks,
  show,
  sleep,
  stderrLogger,
  withTimeout,
};
