"use strict";
// Clients of tests/test_instance_death.py: N official JS clients with automatic reconnect, through a
// round-robin front to three instances. One JSON object per stdout line:
//   {"event": "ready", "clients": [{"client": i, "pid": P, "group": G}, ...]}   all connected
//   {"event": "reconnecting", "client": i, "error": "..." | null}
//   {"event": "reconnected", "client": i, "pid": P}
//   {"event": "closed", "client": i, "error": "..."}                           gave up (a failure)
//   {"event": "report", "clients": [{client, pids, group, broadcasts, groups, reconnects}, ...]}
// stdin commands, one per line: "report", "stop" (close every connection, then exit).
// Usage: node death.cjs <front url> <clients>

const readline = require("node:readline");
const signalR = require("@microsoft/signalr");

const [base, count] = [process.argv[2], Number(process.argv[3] || 12)];
const READY_TIMEOUT_MS = 20000;

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

const states = [];

async function start(i) {
  const group = `g${i % 3}`;
  const state = { client: i, group, pids: [], broadcasts: [], groups: [], reconnects: 0, connection: null };
  const connection = new signalR.HubConnectionBuilder()
    .withUrl(`${base}/hub?group=${group}`, { transport: signalR.HttpTransportType.WebSockets })
    .withAutomaticReconnect([0, 250, 500, 1000, 1000, 1000, 2000, 2000, 2000, 2000, 2000, 2000])
    .configureLogging(signalR.LogLevel.None)
    .build();
  state.connection = connection;
  connection.on("Broadcast", (seq) => state.broadcasts.push(seq));
  connection.on("Group", (name, seq) => state.groups.push([name, seq]));
  // the error the connection was lost with: none when the server closed it with "reconnect allowed"
  connection.onreconnecting((err) => emit({ event: "reconnecting", client: i, error: err ? String(err) : null }));
  connection.onreconnected(async () => {
    state.reconnects += 1;
    try {
      const who = await connection.invoke("Whoami");
      state.pids.push(who.pid);
      emit({ event: "reconnected", client: i, pid: who.pid });
    } catch (err) {
      emit({ event: "reconnected", client: i, pid: null, error: String(err) });
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
    .map(({ client, pids, group, broadcasts, groups, reconnects }) => ({
      client,
      pids,
      group,
      broadcasts,
      groups,
      reconnects,
    }));
}

async function main() {
  const timer = setTimeout(() => {
    emit({ event: "error", error: "clients not connected in time" });
    process.exit(2);
  }, READY_TIMEOUT_MS);
  const all = [];
  for (let i = 0; i < count; i++) all.push(await start(i)); // one at a time: round robin spreads them
  clearTimeout(timer);
  emit({ event: "ready", clients: all.map((s) => ({ client: s.client, pid: s.pids[0], group: s.group })) });
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
