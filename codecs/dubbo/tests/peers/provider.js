'use strict';
// Real Dubbo provider for the test suite: sofa-rpc-node 2.10.0 + dubbo-remoting 2.1.4, no registry.
// Prints one JSON line {"port": N} on stdout once it listens on 127.0.0.1.
const net = require('net');

// sofa-rpc-node calls listen(port) without a host; force loopback.
const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function listen(...args) {
  if (typeof args[0] === 'number') {
    const callback = args.find(a => typeof a === 'function');
    return originalListen.call(this, args[0], '127.0.0.1', callback);
  }
  return originalListen.apply(this, args);
};

const { RpcServer } = require('sofa-rpc-node').server;

const quiet = () => {};
const logger = { info: quiet, warn: quiet, debug: quiet, error: quiet };
const server = new RpcServer({ logger, port: 0, protocol: require('dubbo-remoting') });
// Make the request (with its attachments) visible to service methods as `this.req`.
server.createContext = req => ({ req });

server.addService({ interfaceName: 'com.example.DemoService', version: '1.0.0', group: '' }, {
  async sayHello(name) {
    return 'Hello ' + name;
  },
  async attachments() {
    const props = Object.assign({}, this.req.data.requestProps);
    return JSON.stringify(props);
  },
  async fail(message) {
    throw new Error(message);
  },
  async exceptionResult(message) {
    return new Error(message);
  },
});

server.on('error', err => process.stderr.write(String(err && err.stack) + '\n'));
server.start().then(() => {
  server.ready(() => {
    process.stdout.write(JSON.stringify({ port: server.publishPort }) + '\n');
  });
});
// Exit when the parent closes our stdin (no orphans).
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
