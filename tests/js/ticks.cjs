"use strict";
// What a client of the fleets (fleet.cjs, service_fleet.cjs) made of the numbered "Tick"
// broadcasts it received: first, last, count, duplicates, out of order, missing in between.

function summary(ticks) {
  if (ticks.length === 0) return { first: null, last: null, count: 0, duplicates: 0, missing: 0, outOfOrder: 0 };
  const seen = new Set();
  let duplicates = 0;
  let outOfOrder = 0;
  for (let i = 0; i < ticks.length; i++) {
    if (seen.has(ticks[i])) duplicates++;
    seen.add(ticks[i]);
    if (i > 0 && ticks[i] < ticks[i - 1]) outOfOrder++;
  }
  const first = Math.min(...ticks);
  const last = Math.max(...ticks);
  return { first, last, count: ticks.length, duplicates, outOfOrder, missing: last - first + 1 - seen.size };
}

module.exports = { summary };
