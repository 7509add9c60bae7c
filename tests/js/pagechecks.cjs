"use strict";
// What the Chromium suites share (tests/interop/browser.cjs, tests/js/compression-browser.cjs): launch
// Debian's Chromium through playwright-core, and for each run open a page, evaluate its checks there
// (bounded), print one JSON line per check ({"name": "<prefix>/<check>", "ok", "detail"}) and log
// what failed, with the page's errors, to stderr.

const { chromium } = require("playwright-core");

const RUN_TIMEOUT_MS = 60000;

/**
 * @param {string} executablePath Chromium
 * @param {Array<{prefix: string, url: string, args: object}>} runs one page each
 * @param {Function} pageChecks runs in the page with `args`; returns [{name, ok, detail}]
 */
async function runPageChecks(executablePath, runs, pageChecks) {
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    timeout: 30000,
  });
  try {
    for (const run of runs) {
      const page = await browser.newPage();
      const pageErrors = [];
      page.on("pageerror", (err) => pageErrors.push(String(err)));
      try {
        await page.goto(run.url, { timeout: 15000 });
        const results = await Promise.race([
          page.evaluate(pageChecks, run.args),
          new Promise((_, reject) => setTimeout(() => reject(new Error("page checks timed out")), RUN_TIMEOUT_MS)),
        ]);
        for (const result of results) {
          process.stdout.write(`${JSON.stringify({ ...result, name: `${run.prefix}/${result.name}` })}\n`);
        }
      } catch (err) {
        process.stderr.write(`${run.prefix}: ${err && err.stack}\n${pageErrors.join("\n")}\n`);
      } finally {
        await page.close();
      }
    }
  } finally {
    await browser.close();
  }
}

/** Run `main` and exit: 0 when it returned (the checks' lines say what passed), 2 when it threw. */
function exitAfter(main) {
  main().then(
    () => process.exit(0),
    (err) => {
      process.stderr.write(`${err && err.stack}\n`);
      process.exit(2);
    },
  );
}

module.exports = { runPageChecks, exitAfter };
