// Dubbo's read-only event (a provider's drain notice) through dubbo-remoting 2.1.4's own code.
//   node readonly_event.js decode HEX   prints the packets its stream decoder (the one
//                                       sofa-rpc-node reads sockets with) emits, as JSON
//   node readonly_event.js encode ID    prints, as hex, its encoding of a one-way event
//                                       Request with data 'R' (Request.READONLY_EVENT)
'use strict';

const DubboDecoder = require('dubbo-remoting/lib/decoder');
const Request = require('dubbo-remoting/lib/protocol/request');

const [command, argument] = process.argv.slice(2);
if (command === 'decode') {
  const decoder = new DubboDecoder();
  const packets = [];
  for (const event of [ 'request', 'response', 'heartbeat' ]) {
    decoder.on(event, packet => {
      packets.push({ event, packetType: packet.packetType, packetId: packet.packetId, data: packet.data });
    });
  }
  decoder.on('error', err => { console.error(err.stack); process.exit(1); });
  decoder.end(Buffer.from(argument, 'hex'), () => console.log(JSON.stringify(packets)));
} else if (command === 'encode') {
  const request = new Request(Number(argument));
  request.event = 'R';
  request.isTwoWay = false;
  console.log(request.encode().toString('hex'));
} else {
  console.error('usage: readonly_event.js decode HEX | encode ID');
  process.exit(2);
}
