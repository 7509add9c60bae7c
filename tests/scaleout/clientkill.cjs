"use strict";
// CLIENT KILL TYPE pubsub: every instance's subscriber is cut; each must notice and resubscribe.
//
// Usage: node tests/scaleout/clientkill.cjs <url1> <url2> <url3>
// Step "kill_pubsub": the test kills the pub/sub clients and waits for every instance's
// subscriber_reconnects >= 1. Prints one JSON line per check (see lib.cjs).

const { check, connect, ensure, expectExactlyOnce, getJson, invoke, post, run, step, stopAll, unique } =
  require("./lib.cjs");

const urls = process.argv.slice(2);

run(async () => {
  const clients = [];
  const ok = await check("client_kill_setup", async () => {
    for (const [i, base] of urls.entries()) {
      clients.push(await connect(base, { tag: `k${i + 1}`, user: `kuser${i + 1}` }));
    }
    await invoke(clients[1], "JoinGroup", "kill-group");
    await post(`${urls[0]}/publish/before`);
    return expectExactlyOnce(clients, clients, "http:before");
  });
  if (!ok) return;
  const [k1, k2, k3] = clients;

  await step("kill_pubsub");

  await check("client_kill_publish_reaches_all_clients_again", async () => {
    const value = unique("after");
    await post(`${urls[0]}/publish/${value}`);
    return expectExactlyOnce(clients, clients, `http:${value}`);
  });

  await check("client_kill_group_user_connection_subscriptions_renewed", async () => {
    const v1 = unique("group");
    await invoke(k3, "SendGroup", "kill-group", v1);
    await expectExactlyOnce(clients, [k2], `group:${v1}`, "group send");
    const v2 = unique("user");
    await invoke(k1, "SendUser", "kuser3", v2);
    await expectExactlyOnce(clients, [k3], `user:${v2}`, "user send");
    const v3 = unique("client");
    await invoke(k2, "SendClient", k1.id, v3);
    await expectExactlyOnce(clients, [k1], `client:${v3}`, "remote client send");
  });

  await check("client_kill_health_after", async () => {
    const health = await Promise.all(urls.map((u) => getJson(`${u}/health`)));
    for (const [i, h] of health.entries()) {
      ensure(
        h.state === "connected" && h.subscriber_reconnects >= 1 && h.buffered === 0,
        `instance ${i + 1}: ${JSON.stringify(h)}`,
      );
    }
    return JSON.stringify(health.map((h) => [h.subscriber_reconnects, h.publisher_reconnects, h.stalls_detected]));
  });

  await stopAll(clients);
});
