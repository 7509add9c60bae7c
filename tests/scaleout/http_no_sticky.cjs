"use strict";
// No sticky sessions for the HTTP transports: the official client over long polling (json and
// messagepack) and Server-Sent Events (json) behind a round-robin proxy, so its negotiate, polls or
// event stream, POSTs and DELETE land on different instances. The instance that started the
// transport holds the connection; the others relay to it over Redis.
//
// Usage: node tests/scaleout/http_no_sticky.cjs <url1> <url2> <url3>

const {
  check,
  connect,
  ensure,
  eq,
  expectExactlyOnce,
  invoke,
  post,
  run,
  signalR,
  startProxy,
  stopAll,
  sleep,
  unique,
} = require("./lib.cjs");

const backends = process.argv.slice(2).map((u) => new URL(u));
const T = signalR.HttpTransportType;
const MODES = [
  { name: "longpolling_json", transport: T.LongPolling, protocol: "json" },
  { name: "longpolling_messagepack", transport: T.LongPolling, protocol: "messagepack" },
  { name: "sse_json", transport: T.ServerSentEvents, protocol: "json" },
];

run(async () => {
  const proxy = await startProxy(backends);
  const pids = [];
  for (const backend of backends) pids.push(Number(await (await fetch(new URL("/whoami", backend))).text()));

  for (const mode of MODES) {
    const clients = [];
    const group = unique(`g-${mode.name}`);
    const first = proxy.log.length;

    await check(`${mode.name}_connect_through_round_robin`, async () => {
      for (let i = 0; i < 3; i++) {
        const client = await connect(proxy.url, {
          tag: `${mode.name}-${i}`,
          protocol: mode.protocol,
          transport: mode.transport,
          user: `u-${mode.name}`,
        });
        clients.push(client);
      }
      const used = new Set(proxy.log.slice(first).map((e) => e.backend));
      ensure(used.size === backends.length, `requests spread over ${used.size} instances`);
      return `${proxy.log.length - first} requests over ${used.size} instances`;
    });
    if (clients.length !== 3) continue;

    await check(`${mode.name}_invocations_answered_by_owner`, async () => {
      const seen = new Set();
      for (const client of clients) {
        for (let k = 0; k < 3; k++) {
          const me = await invoke(client, "Whoami");
          eq(me.connectionId, client.id, `${client.tag}'s connection id`);
          ensure(pids.includes(me.pid), `pid ${me.pid} is one of the instances`);
          seen.add(`${client.tag}@${me.pid}`);
        }
      }
      // each connection is served by exactly one instance, whichever instance the POSTs hit
      eq(seen.size, clients.length, `owners ${[...seen].join(", ")}`);
    });

    await check(`${mode.name}_broadcast_once`, async () => {
      const value = unique("b");
      await post(`${backends[1].origin}/publish/${value}`);
      return expectExactlyOnce(clients, clients, `http:${value}`);
    });

    await check(`${mode.name}_group_and_client_sends`, async () => {
      await invoke(clients[0], "JoinGroup", group);
      await invoke(clients[2], "JoinGroup", group);
      const value = unique("g");
      await invoke(clients[1], "SendGroup", group, value);
      await expectExactlyOnce(clients, [clients[0], clients[2]], `group:${value}`);
      const direct = unique("c");
      await invoke(clients[0], "SendClient", clients[1].id, direct);
      await expectExactlyOnce(clients, [clients[1]], `client:${direct}`);
    });

    await check(`${mode.name}_stop_ends_the_connection`, async () => {
      const gone = clients.pop();
      await gone.conn.stop();
      eq(gone.conn.state, signalR.HubConnectionState.Disconnected, "state after stop");
      // the instance holding it ran on_disconnected: a send to it reaches nobody, others still work
      const value = unique("after-stop");
      let reply = "";
      for (let attempt = 0; attempt < 50; attempt++) {
        reply = String(await invoke(clients[0], "AskClient", gone.id));
        if (reply.startsWith("error:")) break;
        await sleep(200);
      }
      ensure(reply.startsWith("error:"), `the stopped connection still answers: ${reply}`);
      await post(`${backends[2].origin}/publish/${value}`);
      return expectExactlyOnce(clients, clients, `http:${value}`);
    });

    await stopAll(clients);
  }
  proxy.server.close();
});
