"use strict";
// The outage buffer is bounded: past it the oldest messages are dropped and counted.
//
// Usage: node tests/scaleout/overflow.cjs <url1 (small buffer)> <url2> <messages> <buffer>
// Steps: "kill_redis", "restart_redis". Prints one JSON line per check (see lib.cjs).

const { check, connect, eq, expectExactlyOnce, getJson, post, run, sleep, step, stopAll, waitFor } =
  require("./lib.cjs");

const [url1, url2, total, size] = process.argv.slice(2);
const TOTAL = Number(total);
const BUFFER = Number(size);

run(async () => {
  const clients = [];
  const ok = await check("overflow_setup", async () => {
    clients.push(await connect(url1, { tag: "v1" }), await connect(url2, { tag: "v2", protocol: "messagepack" }));
    await post(`${url1}/publish/before`);
    return expectExactlyOnce(clients, clients, "http:before");
  });
  if (!ok) return;
  const httpMessages = (client) => client.got.filter((m) => m.startsWith("http:"));

  await step("kill_redis");

  await check("overflow_health_counts_drops", async () => {
    for (let i = 0; i < TOTAL; i++) await post(`${url1}/publish/ov-${i}`);
    const h = await getJson(`${url1}/health`);
    eq({ dropped: h.dropped, buffered: h.buffered }, { dropped: TOTAL - BUFFER, buffered: BUFFER }, "instance 1 health");
    return JSON.stringify(h);
  });

  await step("restart_redis");

  // instance 1's own client got every send when it was made; the other instance gets what was left in
  // the buffer: the last BUFFER, in order
  await check("overflow_remote_clients_get_the_last_buffer_messages_in_order", async () => {
    const want = ["http:before"];
    for (let i = TOTAL - BUFFER; i < TOTAL; i++) want.push(`http:ov-${i}`);
    await waitFor(
      () => clients.every((c) => httpMessages(c).includes(`http:ov-${TOTAL - 1}`)),
      15000,
      "the last buffered message on every client",
      () => JSON.stringify(clients.map(httpMessages)),
    );
    await sleep(300);
    eq(httpMessages(clients[1]), want, `${clients[1].tag}'s broadcasts`);
  });

  await check("overflow_sender_clients_get_every_message", async () => {
    const want = ["http:before", ...Array.from({ length: TOTAL }, (_, i) => `http:ov-${i}`)];
    eq(httpMessages(clients[0]), want, `${clients[0].tag}'s broadcasts`);
  });

  await check("overflow_health_after_recovery", async () => {
    const h = await getJson(`${url1}/health`);
    eq(
      { state: h.state, dropped: h.dropped, buffered: h.buffered },
      { state: "connected", dropped: TOTAL - BUFFER, buffered: 0 },
      "instance 1 health after recovery",
    );
    return JSON.stringify(h);
  });

  await stopAll(clients);
});
