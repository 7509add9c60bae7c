"use strict";
// Redis goes away mid-run and comes back on the same port.
//
// Usage: node tests/scaleout/outage.cjs <url1> <url2> <url3>
// Instance 1 must run with SCALEOUT_ASK_TIMEOUT=1 (its AskClient gives up after 1 s), the others with
// the default 10 s.
// Steps: "kill_redis" (the test kills it and waits until every instance reports degraded),
// "restart_redis". Prints one JSON line per check (see lib.cjs).

const {
  check,
  connect,
  ensure,
  eq,
  expectExactlyOnce,
  getJson,
  invoke,
  post,
  run,
  sleep,
  step,
  stopAll,
  unique,
  waitFor,
  withTimeout,
} = require("./lib.cjs");

const urls = process.argv.slice(2);
const DURING = 5;

run(async () => {
  const clients = [];
  const c = {};
  const ok = await check("outage_setup", async () => {
    for (const [i, base] of urls.entries()) {
      for (const [suffix, protocol] of [["a", "json"], ["b", "messagepack"]]) {
        const tag = `o${i + 1}${suffix}`;
        c[tag] = await connect(base, { tag, protocol, user: `user-${tag}` });
        clients.push(c[tag]);
      }
    }
    await invoke(c.o3a, "JoinGroup", "joined-before-outage");
    await post(`${urls[0]}/publish/before`);
    return expectExactlyOnce(clients, clients, "http:before");
  });
  if (!ok) return;
  const httpMessages = (client) => client.got.filter((m) => m.startsWith("http:"));

  await step("kill_redis");

  const during = Array.from({ length: DURING }, (_, i) => `http:during-${i}`);
  const sentAt = Date.now();
  await check("outage_http_publish_returns_during_outage", async () => {
    for (let i = 0; i < DURING; i++) {
      await withTimeout(post(`${urls[0]}/publish/during-${i}`), 2000, `POST /publish/during-${i}`);
    }
  });

  // the sending instance delivers to its own clients when the send is made; the others wait for Redis
  await check("outage_sender_clients_get_sends_at_once", async () => {
    const own = [c.o1a, c.o1b];
    await waitFor(
      () => own.every((x) => httpMessages(x).length >= 1 + DURING),
      1000,
      "instance 1's clients to get instance 1's sends while Redis is down",
      () => JSON.stringify(Object.fromEntries(own.map((x) => [x.tag, httpMessages(x)]))),
    );
    const ms = Date.now() - sentAt;
    for (const x of own) eq(httpMessages(x), ["http:before", ...during], `${x.tag}'s broadcasts`);
    return `${ms} ms from the first send`;
  });

  await check("outage_local_clients_served_during_outage", async () => {
    for (const client of clients) {
      const me = await withTimeout(client.conn.invoke("Whoami"), 2000, `${client.tag}.invoke(Whoami)`);
      eq(me.connectionId, client.id, `${client.tag} Whoami`);
    }
    const value = unique("local");
    await withTimeout(invoke(c.o2a, "SendClient", c.o2b.id, value), 2000, "SendClient to a local connection");
    await expectExactlyOnce(clients, [c.o2b], `client:${value}`, "local SendClient during the outage");
    await withTimeout(invoke(c.o1a, "JoinGroup", "joined-during-outage"), 2000, "JoinGroup during the outage");
    eq(clients.filter((x) => x.closed).map((x) => x.tag), [], "clients closed by the outage");
  });

  await check("outage_client_result_times_out_during_outage", async () => {
    const start = Date.now();
    const answer = await withTimeout(invoke(c.o1a, "AskClient", c.o3a.id), 4000, "AskClient during the outage");
    eq(answer, "error: Client result timed out.", "AskClient (1 s timeout) of a remote client while Redis is down");
    return `${Date.now() - start} ms`;
  });

  // asked now, answered once Redis is back (10 s timeout on instance 2)
  const askedDuringOutage = invoke(c.o2a, "AskClient", c.o1b.id).then(
    (value) => ({ value }),
    (error) => ({ error: String(error) }),
  );

  await check("outage_health_shows_buffered", async () => {
    // instance 2's request was sent without waiting: let it reach the server (bounded)
    const deadline = Date.now() + 3000;
    while ((await getJson(`${urls[1]}/health`)).buffered < 1 && Date.now() < deadline) await sleep(20);
    const health = await Promise.all(urls.map((u) => getJson(`${u}/health`)));
    const summary = health.map((h) => ({ state: h.state, buffered: h.buffered, dropped: h.dropped }));
    // instance 1: the broadcasts + the timed-out client-result request; instance 2: its request
    eq(summary, [
      { state: "degraded", buffered: DURING + 1, dropped: 0 },
      { state: "degraded", buffered: 1, dropped: 0 },
      { state: "degraded", buffered: 0, dropped: 0 },
    ], "health during the outage");
    const early = clients.filter((x) => httpMessages(x).some((m) => m.startsWith("http:during")));
    eq(early.map((x) => x.tag), ["o1a", "o1b"], "clients that got an outage message while Redis was down");
    return JSON.stringify(summary);
  });

  await step("restart_redis");

  await check("outage_buffered_messages_arrive_in_order_exactly_once", async () => {
    const want = ["http:before", ...during];
    await waitFor(
      () => clients.every((x) => httpMessages(x).length >= want.length),
      15000,
      "the outage's messages on every client",
      () => JSON.stringify(Object.fromEntries(clients.map((x) => [x.tag, httpMessages(x)]))),
    );
    await new Promise((resolve) => setTimeout(resolve, 300));
    for (const client of clients) eq(httpMessages(client), want, `${client.tag}'s broadcasts`);
  });

  await check("outage_client_result_requested_during_outage_completes", async () => {
    eq(await askedDuringOutage, { value: "result-o1b" }, "AskClient issued during the outage, after recovery");
  });

  await check("outage_cross_instance_traffic_recovers", async () => {
    const value = unique("after");
    await post(`${urls[0]}/publish/${value}`);
    await expectExactlyOnce(clients, clients, `http:${value}`, "publish after recovery");
    const v1 = unique("grp-during");
    await invoke(c.o3b, "SendGroup", "joined-during-outage", v1);
    await expectExactlyOnce(clients, [c.o1a], `group:${v1}`, "group joined during the outage");
    const v2 = unique("grp-before");
    await invoke(c.o1b, "SendGroup", "joined-before-outage", v2);
    await expectExactlyOnce(clients, [c.o3a], `group:${v2}`, "group joined before the outage");
    const v3 = unique("conn");
    await invoke(c.o1a, "SendClients", [c.o3b.id], v3);
    await expectExactlyOnce(clients, [c.o3b], `clients:${v3}`, "connection channel");
    const v4 = unique("user");
    await invoke(c.o3a, "SendUser", "user-o2b", v4);
    await expectExactlyOnce(clients, [c.o2b], `user:${v4}`, "user channel");
    eq(clients.filter((x) => x.closed).map((x) => x.tag), [], "clients closed by the outage");
  });

  await check("outage_health_after_recovery", async () => {
    const health = await Promise.all(urls.map((u) => getJson(`${u}/health`)));
    for (const [i, h] of health.entries()) {
      ensure(
        h.state === "connected" && h.buffered === 0 && h.dropped === 0 &&
          h.publisher_reconnects >= 1 && h.subscriber_reconnects >= 1,
        `instance ${i + 1} health after recovery: ${JSON.stringify(h)}`,
      );
    }
    ensure(health[0].published >= DURING + 2, `instance 1 published: ${health[0].published}`);
    return JSON.stringify(health.map((h) => [h.publisher_reconnects, h.subscriber_reconnects, h.published]));
  });

  await stopAll(clients);
});
