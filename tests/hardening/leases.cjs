"use strict";
// Clients of tests/test_instance_leases.py: official JS clients with automatic reconnect over
// Server-Sent Events and long polling (JSON and MessagePack), and WebSockets for comparison, through
// a round-robin front to several instances. Clients of each mode are started until that mode has a
// connection held by every instance, so whichever instance dies, every mode loses some.
// One JSON object per stdout line (times `at` in seconds since the epoch):
//   {"event": "ready", "clients": [{"client": i, "mode": M, "pid": P}, ...]}
//   {"event": "reconnecting", "client": i, "at": T, "error": "..." | null}
//   {"event": "reconnected", "client": i, "at": T, "pid": P}
//   {"event": "closed", "client": i, "error": "..."}                       gave up (a failure)
//   {"event": "report", "clients": [{client, mode, pids, state, broadcasts, reconnects}, ...]}
// stdin commands, one per line: "report", "stop" (close every connection, then exit).
// Usage: node leases.cjs <front url> <instances> <mode,mode,...>

const readline = require("node:readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const [base, instances, modeList] = [process.argv[2], Number(process.argv[3]), process.argv[4]];
const READY_TIMEOUT_MS = 60000;
const MAX_PER_MODE = 15;
const T = signalR.HttpTransportType;
const MODES = {
  sse_json: [T.ServerSentEvents, "json"],
  longpolling_json: [T.LongPolling, "json"],
  longpolling_messagepack: [T.LongPolling, "messagepack"],
  websockets_json: [T.WebSockets, "json"],
};

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

const now = () => Date.now() / 1000;
const states = [];

async function start(i, mode) {
  const [transport, protocol] = MODES[mode];
  const state = { client: i, mode, pids: [], broadcasts: [], reconnects: 0, connection: null };
  const builder = new signalR.HubConnectionBuilder()
    .withUrl(`${base}/hub`, { transport })
    .withAutomaticReconnect([0, 250, 500, 1000, 1000, 1000, 2000, 2000, 2000, 2000, 2000, 2000])
    .configureLogging(signalR.LogLevel.None);
  if (protocol === "messagepack") builder.withHubProtocol(new MessagePackHubProtocol());
  const connection = builder.build();
  state.connection = connection;
  connection.on("Broadcast", (seq) => state.broadcasts.push(seq));
  connection.onreconnecting((err) =>
    emit({ event: "reconnecting", client: i, at: now(), error: err ? String(err) : null }),
  );
  connection.onreconnected(async () => {
    const at = now();
    state.reconnects += 1;
    try {
      const who = await connection.invoke("Whoami");
      state.pids.push(who.pid);
      emit({ event: "reconnected", client: i, at, pid: who.pid });
    } catch (err) {
      emit({ event: "reconnected", client: i, at, pid: null, error: String(err) });
    }
  });
  connection.onclose((err) => {
    if (!state.stopping) emit({ event: "closed", client: i, error: String(err) });
  });
  await connection.start();
  const who = await connection.invoke("Whoami");
  state.pids.push(who.pid);
  states.push(state);
  return state;
}

function report() {
  return states
    .slice()
    .sort((a, b) => a.client - b.client)
    .map(({ client, mode, pids, connection, broadcasts, reconnects }) => ({
      client,
      mode,
      pids,
      state: connection.state,
      broadcasts,
      reconnects,
    }));
}

async function main() {
  const timer = setTimeout(() => {
    emit({ event: "error", error: "clients not connected in time" });
    process.exit(2);
  }, READY_TIMEOUT_MS);
  let next = 0;
  for (const mode of modeList.split(",")) {
    const owners = new Set();
    // one at a time: the round robin spreads them; until every instance holds one of this mode
    for (let k = 0; k < MAX_PER_MODE && owners.size < instances; k++) {
      const state = await start(next++, mode);
      owners.add(state.pids[0]);
    }
  }
  clearTimeout(timer);
  emit({ event: "ready", clients: states.map((s) => ({ client: s.client, mode: s.mode, pid: s.pids[0] })) });
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const command = line.trim();
    if (command === "report") {
      emit({ event: "report", clients: report() });
    } else if (command === "stop") {
      for (const s of states) s.stopping = true;
      const outcomes = await Promise.allSettled(states.map((s) => s.connection.stop()));
      const errors = outcomes.filter((o) => o.status === "rejected").map((o) => String(o.reason));
      emit({ event: "stopped", errors });
      process.exit(0);
    }
  }
}

main().catch((err) => {
  emit({ event: "error", error: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
