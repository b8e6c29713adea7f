'use strict';
// Real Dubbo peers for the demo and the end-to-end tests: sofa-rpc-node + dubbo-remoting.
//
//   node dubbo_peer.js provider VERSION        serve DemoService; prints "READY <port>"
//   node dubbo_peer.js consumer HOST:PORT      JSON-lines RPC on stdin/stdout (one call a line)
//   node dubbo_peer.js load HOST:PORT RATE     steady load; prints cumulative counts as JSON
//
// Modules resolve from NODE_PATH (the launcher points it at peers/node/node_modules).
// Every mode exits when its stdin closes, so a crashed parent never leaves it behind.

const net = require('net');
const readline = require('readline');

// sofa-rpc-node listens without a host; keep every listener on loopback.
const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number') {
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    return originalListen.call(this, { port: args[0], host: '127.0.0.1' }, cb);
  }
  return originalListen.apply(this, args);
};

const { RpcServer } = require('sofa-rpc-node').server;
const { RpcClient } = require('sofa-rpc-node').client;
const protocol = require('dubbo-remoting');
const java = require('js-to-java');

const INTERFACE = 'org.apache.dubbo.samples.basic.api.DemoService';
const SERVICE_VERSION = '1.0.0';
const quiet = { info() {}, warn() {}, debug() {}, error() {} };
const loggerFor = verbose => (verbose ? console : quiet);

function exitOnStdinEnd(onLine, onClose) {
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', line => { if (onLine) onLine(line); });
  rl.on('close', () => {
    if (onClose) onClose();
    process.exit(0);
  });
}

class ContextServer extends RpcServer {
  // Hand the request to the method as `this`, so methods can read attachments.
  createContext(req) { return { req }; }
}

async function provider(version) {
  const server = new ContextServer({
    logger: loggerFor(process.env.DUBBO_PEER_VERBOSE), port: 0, protocol, group: '',
  });
  const state = { requests: 0 };
  server.addService({ interfaceName: INTERFACE, version: SERVICE_VERSION, group: '' }, {
    async sayHello(name) { state.requests++; return `${version}: hello ${name}`; },
    async ping() { state.requests++; return `${version}: pong`; },
    // For the end-to-end tests.
    async attachments() {
      state.requests++;
      return JSON.stringify({ version, props: this.req.data.requestProps || {} });
    },
    async sleep(ms) {
      state.requests++;
      await new Promise(resolve => setTimeout(resolve, Number(ms)));
      return `${version}: slept ${ms}`;
    },
    async crash() { process.exit(3); },
    async fail(message) { throw new Error(String(message)); },
  });
  await server.start();
  const port = server._servers[0].address().port;
  process.stdout.write(`READY ${port}\n`);
  exitOnStdinEnd(line => {
    if (line.trim() === 'count') process.stdout.write(`COUNT ${state.requests}\n`);
  });
}

function makeConsumer(target, timeout) {
  const client = new RpcClient({ logger: loggerFor(process.env.DUBBO_PEER_VERBOSE), protocol });
  const consumer = client.createConsumer({
    interfaceName: INTERFACE, version: SERVICE_VERSION, group: '', serverHost: target,
    responseTimeout: timeout,
  });
  return { client, consumer };
}

function javaArgs(args) {
  return (args || []).map(a => (typeof a === 'number' ? java.int(a) : java.String(String(a))));
}

async function consumer(target) {
  const { consumer } = makeConsumer(target, 5000);
  await consumer.ready();
  process.stdout.write('READY 0\n');
  exitOnStdinEnd(async line => {
    if (!line.trim()) return;
    const call = JSON.parse(line);
    const reply = { id: call.id };
    try {
      reply.result = await consumer.invoke(call.method, javaArgs(call.args), {
        responseTimeout: call.timeout || 5000, requestProps: call.props || {},
      });
      reply.ok = true;
    } catch (err) {
      reply.ok = false;
      reply.error = `${err.name}: ${err.message}`;
    }
    process.stdout.write(JSON.stringify(reply) + '\n');
  });
}

async function load(target, rate) {
  const { consumer } = makeConsumer(target, 3000);
  await consumer.ready();
  process.stdout.write('READY 0\n');
  const counts = { sayHello: {}, ping: {} };
  let errors = 0;
  let lastError = '';
  let n = 0;
  let inflight = 0;
  const one = async method => {
    inflight++;
    try {
      const args = method === 'sayHello' ? [java.String('mesh')] : [];
      const result = await consumer.invoke(method, args, { responseTimeout: 3000 });
      const version = String(result).split(':')[0];
      counts[method][version] = (counts[method][version] || 0) + 1;
    } catch (err) {
      errors++;
      lastError = `${err.name}: ${err.message}`;
    } finally {
      inflight--;
    }
  };
  // Every fifth call is sayHello; the rest exercise the weighted split.
  const tick = () => { one(n++ % 5 === 0 ? 'sayHello' : 'ping'); };
  const ticker = setInterval(tick, Math.max(1, Math.round(1000 / rate)));
  const report = () => process.stdout.write(JSON.stringify({ counts, errors, lastError }) + '\n');
  setInterval(report, 200);
  // On stdin's end, stop calling and let the calls in flight finish (the engine has answered
  // or will: counting them keeps the summary equal to the engine's /stats), at most 800 ms,
  // within the second the parent waits before SIGTERM.
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('close', async () => {
    clearInterval(ticker);
    const deadline = Date.now() + 800;
    while (inflight > 0 && Date.now() < deadline) await new Promise(r => setTimeout(r, 5));
    report();
    process.exit(0);
  });
}

const [mode, arg1, arg2] = process.argv.slice(2);
const modes = {
  provider: () => provider(arg1 || 'v1'),
  consumer: () => consumer(arg1),
  load: () => load(arg1, Number(arg2 || 100)),
};
if (!modes[mode]) {
  process.stderr.write('usage: dubbo_peer.js provider VERSION | consumer HOST:PORT | load HOST:PORT RATE\n');
  process.exit(2);
}
modes[mode]().catch(err => {
  process.stderr.write(`dubbo_peer: ${err.stack || err}\n`);
  process.exit(1);
});
