// BullMQ, the peer qkit measures itself against (bench/README.md), run by bench/bullmq.py.
//
//   node bullmq_peer.mjs throughput <redis_url> <n> <concurrency>
//     adds n no-op jobs with addBulk in chunks of 1,000, then drains them with one Worker at
//     <concurrency> in a fresh Node process (forked, its start-up timed, as qkit's and the Python peers'
//     workers are); then adds n more and drains them with a Worker in this process (no start-up: the
//     "warm" figures).  One JSON line: enqueue_s, drain_s, worker_startup_s, e2e_jobs_per_s, cpu_s (both
//     processes, the first round), and the warm round's enqueue_warm_s, drain_warm_s, e2e_warm_jobs_per_s.
//   node bullmq_peer.mjs latency <redis_url> <rate> <seconds> <concurrency>
//     a Worker in a child process; this process adds one job every 1/rate s (each add awaited) with
//     its wall-clock time; the handler notes when it starts.  One JSON line: the delays add -> start in
//     ms (p50, p90, p99, max) and how many jobs.
// Both use a fresh queue name and obliterate it afterwards.
import { Queue, Worker } from 'bullmq';
import { fork } from 'node:child_process';
import { performance } from 'node:perf_hooks';

const now = () => performance.timeOrigin + performance.now();  // ms since the epoch, sub-ms precision
const [mode, url, ...rest] = process.argv.slice(2);
const u = new URL(url);
// redis://[:password@]host:port/db, or unix:///path/to/socket?password=... (qkit's embedded server)
const connection = u.protocol === 'unix:'
  ? { path: decodeURIComponent(u.pathname), password: u.searchParams.get('password') || undefined }
  : { host: u.hostname, port: Number(u.port || 6379), password: decodeURIComponent(u.password) || undefined };
connection.maxRetriesPerRequest = null;
connection.retryStrategy = (times) => (times > 20 ? null : 100);  // give up instead of hanging on a bad URL

function quantile(sorted, q) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

async function addAll(queue, n) {
  for (let i = 0; i < n; i += 1000) {
    const chunk = [];
    for (let j = i; j < Math.min(n, i + 1000); j++) chunk.push({ name: 'noop', data: { i: j } });
    await queue.addBulk(chunk);
  }
}

function drainHere(name, n, concurrency) {  // resolves once n jobs completed; returns the Worker
  let done = 0;
  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  const worker = new Worker(name, async () => {}, { connection, concurrency });
  worker.on('completed', () => { if (++done === n) finish(); });
  return finished.then(() => worker);
}

async function drainWorker(name, n, concurrency) {  // the forked drain process
  const cpu0 = process.cpuUsage();
  process.send({ started: now() });
  const worker = await drainHere(name, n, concurrency);
  const t = now();
  await worker.close();
  const cpu = process.cpuUsage(cpu0);
  process.send({ done: t, cpu_s: (cpu.user + cpu.system) / 1e6 });
  process.exit(0);
}

async function throughput(n, concurrency) {
  const name = `bench-tp-${process.pid}`;
  const queue = new Queue(name, { connection });
  const cpu0 = process.cpuUsage();
  const t0 = now();
  await addAll(queue, n);
  const t1 = now();
  const child = fork(new URL(import.meta.url).pathname, ['drain-worker', url, name, String(n), String(concurrency)]);
  const started = await new Promise((resolve) => child.once('message', (m) => resolve(m.started)));
  const { done, cpu_s: childCpu } = await new Promise((resolve) => child.once('message', resolve));
  const cpu = process.cpuUsage(cpu0);
  // the warm round: a Worker in this process, created after the adds (no start-up)
  await queue.obliterate({ force: true });
  const t3 = now();
  await addAll(queue, n);
  const t4 = now();
  const worker = await drainHere(name, n, concurrency);
  const t5 = now();
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  const enqueue_s = (t1 - t0) / 1000, drain_s = (done - t1) / 1000;
  const enqueue_warm_s = (t4 - t3) / 1000, drain_warm_s = (t5 - t4) / 1000;
  console.log(JSON.stringify({ system: 'bullmq', n, concurrency, enqueue_s, drain_s,
    worker_startup_s: (started - t1) / 1000, e2e_jobs_per_s: n / (enqueue_s + drain_s),
    cpu_s: (cpu.user + cpu.system) / 1e6 + childCpu, enqueue_warm_s, drain_warm_s,
    e2e_warm_jobs_per_s: n / (enqueue_warm_s + drain_warm_s) }));
}

async function latencyWorker(name, concurrency) {
  const delays = [];
  const worker = new Worker(name, async (job) => { delays.push(now() - job.data.t); }, { connection, concurrency });
  await worker.waitUntilReady();
  process.send({ ready: true });
  process.on('message', async (m) => {
    if (m.stop) {
      await worker.close();
      process.send({ delays });
      process.exit(0);
    }
  });
}

async function latency(rate, seconds, concurrency) {
  const name = `bench-lat-${process.pid}`;
  const child = fork(new URL(import.meta.url).pathname, ['latency-worker', url, name, String(concurrency)]);
  await new Promise((resolve) => child.once('message', resolve));
  const queue = new Queue(name, { connection });
  await queue.waitUntilReady();
  const n = Math.round(rate * seconds), step = 1000 / rate, start = now();
  for (let i = 0; i < n; i++) {
    const wait = start + i * step - now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    await queue.add('noop', { t: now() });
  }
  while ((await queue.getJobCounts('completed')).completed < n) await new Promise((r) => setTimeout(r, 50));
  child.send({ stop: true });
  const { delays } = await new Promise((resolve) => child.once('message', resolve));
  await queue.obliterate({ force: true });
  await queue.close();
  delays.sort((a, b) => a - b);
  console.log(JSON.stringify({ system: 'bullmq', rate, jobs: delays.length, concurrency,
    p50_ms: quantile(delays, 0.5), p90_ms: quantile(delays, 0.9), p99_ms: quantile(delays, 0.99),
    max_ms: delays[delays.length - 1] }));
}

if (mode === 'throughput') await throughput(Number(rest[0]), Number(rest[1] || 50));
else if (mode === 'latency') await latency(Number(rest[0]), Number(rest[1]), Number(rest[2] || 1));
else if (mode === 'latency-worker') await latencyWorker(rest[0], Number(rest[1]));
else if (mode === 'drain-worker') await drainWorker(rest[0], Number(rest[1]), Number(rest[2]));
else { console.error(`unknown mode ${mode}`); process.exit(2); }
if (mode !== 'latency-worker' && mode !== 'drain-worker') process.exit(0);
