'use strict';
// Real Dubbo consumer for the test suite: sofa-rpc-node 2.10.0 + dubbo-remoting 2.1.4, no registry.
// Usage: node consumer.js HOST:PORT
// Prints {"ready": true} once started, then reads JSON lines on stdin, one call each:
//   {"id": 1, "method": "sayHello", "args": ["x"], "props": {"k": "v"}, "timeout": 3000}
//   {"id": 2, "heartbeat": true}   (raw dubbo-remoting heartbeat on a fresh socket)
// and prints one JSON line per call: {"id": 1, "result": ...} or {"id": 1, "error": "..."}.
const net = require('net');
const readline = require('readline');
const java = require('js-to-java');
const protocol = require('dubbo-remoting/lib/protocol');
const { RpcClient } = require('sofa-rpc-node').client;

const target = process.argv[2];
const [host, port] = target.split(':');
const quiet = () => {};
const logger = { info: quiet, warn: quiet, debug: quiet, error: quiet };
const client = new RpcClient({ logger, protocol: require('dubbo-remoting') });
const consumer = client.createConsumer({
  interfaceName: 'com.example.DemoService',
  version: '1.0.0',
  group: '',
  serverHost: target,
});

const print = obj => process.stdout.write(JSON.stringify(obj) + '\n');

function heartbeat(id) {
  // One heartbeat request written by dubbo-remoting's own encoder; report the reply frame.
  return new Promise(resolve => {
    const socket = net.connect(Number(port), host);
    const timer = setTimeout(() => { socket.destroy(); resolve({ id, error: 'heartbeat timeout' }); }, 5000);
    let reply = Buffer.alloc(0);
    const frame = protocol.heartbeatEncode(7, null, {});
    socket.on('connect', () => socket.write(frame));
    socket.on('data', chunk => {
      reply = Buffer.concat([ reply, chunk ]);
      if (reply.length >= 16 && reply.length >= 16 + reply.readInt32BE(12)) {
        clearTimeout(timer);
        socket.destroy();
        resolve({ id, sent: frame.toString('hex'), reply: reply.toString('hex') });
      }
    });
    socket.on('error', err => { clearTimeout(timer); resolve({ id, error: err.message }); });
  });
}

async function call(msg) {
  if (msg.heartbeat) return heartbeat(msg.id);
  const args = (msg.args || []).map(a => java.String(a));
  const options = { responseTimeout: msg.timeout || 3000 };
  if (msg.props) options.requestProps = msg.props;
  try {
    const result = await consumer.invoke(msg.method, args, options);
    return { id: msg.id, result: result === undefined ? null : result };
  } catch (err) {
    return { id: msg.id, error: String(err && err.message), name: err && err.name };
  }
}

consumer.ready().then(() => {
  print({ ready: true });
  const lines = readline.createInterface({ input: process.stdin });
  let pending = 0;
  let closed = false;
  const maybeExit = () => { if (closed && pending === 0) process.exit(0); };
  lines.on('line', line => {
    if (!line.trim()) return;
    pending++;
    call(JSON.parse(line)).then(out => { print(out); pending--; maybeExit(); });
  });
  lines.on('close', () => { closed = true; maybeExit(); });
});
