// Dubbo's heartbeat request through dubbo-remoting 2.1.4's own code.
//   node heartbeat.js encode ID   prints, as hex, what its protocol's heartbeatEncode writes
//                                 (a two-way event Request whose data is null, Hessian 2)
//   node heartbeat.js ack ID      prints, as hex, its heartbeatAckEncode (the answer)
// ID is decimal; ids above 2^53 go through as strings (its Long handling reads them).
'use strict';

const protocol = require('dubbo-remoting/lib/protocol');

const [command, argument] = process.argv.slice(2);
const id = Number.isSafeInteger(Number(argument)) ? Number(argument) : argument;
if (command === 'encode') {
  console.log(protocol.heartbeatEncode(id, null, {}).toString('hex'));
} else if (command === 'ack') {
  console.log(protocol.heartbeatAckEncode(id, {}).toString('hex'));
} else {
  console.error('usage: heartbeat.js encode ID | ack ID');
  process.exit(2);
}
