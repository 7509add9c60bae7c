"use strict";
// Two apps on one Redis, told apart only by --channel-prefix: nothing crosses between them.
//
// Usage: node tests/scaleout/isolation.cjs <app1-url,app1-url,...> <app2-url,app2-url,...>
// Step "connected" {app1: [ids], app2: [ids], group, user}: the test inspects PUBSUB CHANNELS/NUMSUB.
// Prints one JSON line per check (see lib.cjs).

const { check, connect, eq, expectExactlyOnce, invoke, post, run, sleep, step, stopAll, unique } = require("./lib.cjs");

const [app1Urls, app2Urls] = process.argv.slice(2).map((arg) => arg.split(","));

run(async () => {
  const group = unique("shared-group");
  const user = unique("shared-user");
  const app1 = [];
  const app2 = [];
  await check("isolation_setup", async () => {
    for (const [i, base] of app1Urls.entries()) app1.push(await connect(base, { tag: `app1-${i + 1}`, user }));
    for (const [i, base] of app2Urls.entries()) {
      app2.push(await connect(base, { tag: `app2-${i + 1}`, user, protocol: "messagepack" }));
    }
    for (const client of [...app1, ...app2]) await invoke(client, "JoinGroup", group);
  });
  if (app1.length !== app1Urls.length || app2.length !== app2Urls.length) return;
  const everyone = [...app1, ...app2];

  await step("connected", { app1: app1.map((c) => c.id), app2: app2.map((c) => c.id), group, user });

  await check("isolation_publish_in_app1_stays_in_app1", async () => {
    const value = unique("app1");
    await post(`${app1Urls[0]}/publish/${value}`);
    return expectExactlyOnce(everyone, app1, `http:${value}`);
  });

  await check("isolation_publish_in_app2_stays_in_app2", async () => {
    const value = unique("app2");
    await post(`${app2Urls[0]}/publish/${value}`);
    return expectExactlyOnce(everyone, app2, `http:${value}`);
  });

  await check("isolation_same_group_name_stays_in_app", async () => {
    const value = unique("group");
    await invoke(app2[0], "SendGroup", group, value);
    await expectExactlyOnce(everyone, app2, `group:${value}`, "group send in app 2");
    const value1 = unique("group");
    await invoke(app1[2 % app1.length], "SendGroup", group, value1);
    await expectExactlyOnce(everyone, app1, `group:${value1}`, "group send in app 1");
  });

  await check("isolation_same_user_name_stays_in_app", async () => {
    const value = unique("user");
    await invoke(app1[0], "SendUser", user, value);
    return expectExactlyOnce(everyone, app1, `user:${value}`);
  });

  await check("isolation_connection_of_other_app_unreachable", async () => {
    const value = unique("client");
    await invoke(app1[0], "SendClient", app2[0].id, value);
    await invoke(app1[0], "SendClients", [app2[1 % app2.length].id], value);
    await sleep(300);
    eq(everyone.filter((c) => c.got.includes(`client:${value}`) || c.got.includes(`clients:${value}`)).map((c) => c.tag), [], "receivers");
    eq(
      await invoke(app1[0], "AskClient", app2[0].id),
      `error: Connection '${app2[0].id}' does not exist.`,
      "AskClient of an app-2 connection from app 1",
    );
  });

  await stopAll(everyone);
});
