"use strict";
// Official JS clients (@microsoft/signalr 10.0.11) of the connection-service tests
// (tests/test_service.py), all in one process, negotiating at app servers and sent to nodes.
// One JSON object per stdout line; stdin takes one JSON command per line:
//   {"cmd": "start", "echoMs": 200, "tickMs": 100}  every client echoes, a broadcaster invokes Tick(n)
//   {"cmd": "sent"}            -> {"event": "sent", "sent": n} (ticks sent so far)
//   {"cmd": "stopticks"}        -> {"event": "ticksStopped", "sent": n, "tickErrors": [...]}
//   {"cmd": "stopechoes"}       -> {"event": "echoesStopped"} once no echo is in flight
//   {"cmd": "call", "method": "Slow", "args": [3000]} -> {"event": "call", "results": [{ok, value, error, ms}]}
//   {"cmd": "groups"}           -> {"event": "groups", "results": [{group, expected, got}]}
//   {"cmd": "report"}           -> {"event": "report", "clients": [...]}
//   {"cmd": "stop"}
// Usage: node service_fleet.cjs <hub url> <kinds as JSON: [{"transport", "protocol"}]> <groups>

const readline = require("node:readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");
const { summary } = require("./ticks.cjs");

const [url, kindsText, groupsText] = [process.argv[2], process.argv[3], process.argv[4]];
const groupCount = Number(groupsText || 10);
const TRANSPORTS = {
  ws: signalR.HttpTransportType.WebSockets,
  sse: signalR.HttpTransportType.ServerSentEvents,
  lp: signalR.HttpTransportType.LongPolling,
};

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function build(kind, query) {
  let builder = new signalR.HubConnectionBuilder()
    .withUrl(url + (query && url.includes("?") ? query.replace("?", "&") : query), {
      transport: TRANSPORTS[kind.transport],
    })
    .withAutomaticReconnect([0, 250, 500, 1000, 2000, 5000])
    .configureLogging(signalR.LogLevel.None);
  if (kind.protocol === "messagepack") builder = builder.withHubProtocol(new MessagePackHubProtocol());
  return builder.build();
}

function client(kind, index) {
  const group = `g${index % groupCount}`;
  const state = {
    kind, index, group, firstId: null, ticks: [], reconnecting: 0, closed: 0, closeErrors: [],
    echoes: 0, echoFails: [], groupGot: [], echoing: false, inFlight: 0,
  };
  const connection = build(kind, `?group=${group}`);
  state.connection = connection;
  connection.on("Tick", (n) => {
    state.ticks.push(n); // a handler returning a value would be taken for a client result
  });
  connection.on("Result", () => index * 10); // a client result, for whoever asks
  connection.on("Group", (g, value) => {
    state.groupGot.push(`${g}:${value}`);
  });
  connection.onreconnecting(() => { state.reconnecting++; });
  connection.onclose((error) => {
    state.closed++;
    state.closeErrors.push(String(error));
  });
  return state;
}

async function echoLoop(state, everyMs) {
  let n = 0;
  while (state.echoing) {
    const value = `${state.index}:${n++}`;
    state.inFlight++;
    try {
      const answer = await state.connection.invoke("Echo", value);
      if (answer !== value) state.echoFails.push(`wrong answer ${answer} for ${value}`);
      state.echoes++;
    } catch (err) {
      state.echoFails.push(String(err));
    } finally {
      state.inFlight--;
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function main() {
  const kinds = JSON.parse(kindsText);
  const clients = kinds.map((kind, i) => client(kind, i));
  const broadcaster = { connection: build({ transport: "ws", protocol: "json" }, ""), sent: 0, running: false, errors: [] };
  // start in batches: a few hundred negotiates at once are not what this test measures
  for (let i = 0; i < clients.length; i += 25) {
    await Promise.all(clients.slice(i, i + 25).map(async (c) => {
      await c.connection.start();
      c.firstId = c.connection.connectionId;
    }));
  }
  await broadcaster.connection.start();
  emit({ event: "ready", clients: clients.map((c) => ({ kind: c.kind, connectionId: c.firstId })) });

  async function tickLoop(everyMs) {
    while (broadcaster.running) {
      const n = broadcaster.sent + 1;
      try {
        await broadcaster.connection.invoke("Tick", n);
        broadcaster.sent = n;
      } catch (err) {
        broadcaster.errors.push(String(err));
      }
      await new Promise((r) => setTimeout(r, everyMs));
    }
  }

  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const cmd = JSON.parse(line);
    if (cmd.cmd === "start") {
      for (const c of clients) {
        c.echoing = true;
        echoLoop(c, cmd.echoMs);
      }
      broadcaster.running = true;
      broadcaster.loop = tickLoop(cmd.tickMs);
    } else if (cmd.cmd === "sent") {
      emit({ event: "sent", sent: broadcaster.sent });
    } else if (cmd.cmd === "stopticks") {
      broadcaster.running = false;
      await broadcaster.loop;
      emit({ event: "ticksStopped", sent: broadcaster.sent, tickErrors: broadcaster.errors });
    } else if (cmd.cmd === "stopechoes") {
      for (const c of clients) c.echoing = false;
      for (let i = 0; i < 200 && clients.some((c) => c.inFlight > 0); i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      emit({ event: "echoesStopped" });
    } else if (cmd.cmd === "call") {
      const results = await Promise.all(clients.map(async (c) => {
        const started = Date.now();
        try {
          const value = await c.connection.invoke(cmd.method, ...(cmd.args || []));
          return { ok: true, value, ms: Date.now() - started };
        } catch (err) {
          return { ok: false, error: String(err), ms: Date.now() - started };
        }
      }));
      emit({ event: "call", results });
    } else if (cmd.cmd === "groups") {
      for (const c of clients) c.groupGot = [];
      await Promise.all(clients.map((c) => c.connection.invoke("ToGroup", c.group, `m${c.index}`)));
      await new Promise((r) => setTimeout(r, 1500));
      const results = clients.map((c) => ({
        group: c.group,
        expected: clients.filter((o) => o.group === c.group).map((o) => `${c.group}:m${o.index}`).sort(),
        got: [...c.groupGot].sort(),
      }));
      emit({ event: "groups", results });
    } else if (cmd.cmd === "report") {
      emit({
        event: "report",
        clients: clients.map((c) => ({
          kind: c.kind, firstId: c.firstId, connectionId: c.connection.connectionId,
          state: c.connection.state, reconnecting: c.reconnecting, closed: c.closed,
          closeErrors: c.closeErrors, echoes: c.echoes, echoFails: c.echoFails.slice(0, 5),
          echoFailCount: c.echoFails.length, ticks: summary(c.ticks),
        })),
      });
    } else if (cmd.cmd === "stop") {
      await Promise.all([...clients.map((c) => c.connection.stop()), broadcaster.connection.stop()]);
      break;
    }
  }
  process.exit(0);
}

main().catch((err) => {
  emit({ event: "error", error: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
