'use strict';
// Interop driver for the Python Hessian 2.0 serializer, run against hessian.js 2.11.0 with
// js-to-java 2.8.0. Modules are resolved from NODE_MODULES (default: peers/node/node_modules).
//
//   node hessian_driver.js encode   prints "name<TAB>hex" for every named sample below
//   node hessian_driver.js decode   reads "name<TAB>count<TAB>hex" lines on stdin, decodes count
//                                   values with DecoderV2 (withType) and prints
//                                   "name<TAB>OK<TAB>desc" or "name<TAB>ERR<TAB>message"
//   node hessian_driver.js bench HEX N [COUNT]   decodes the COUNT (default 1) values in HEX
//                                   and re-encodes them, N times each; prints
//                                   "decode_us<TAB>encode_us" per operation
//
// "desc" is a canonical description (see describe()); the Python tests predict it.

const path = require('path');
const modules = process.env.NODE_MODULES ||
  path.resolve(__dirname, '..', '..', '..', '..', '..', 'peers', 'node', 'node_modules');
const hessian = require(path.join(modules, 'hessian.js'));
const java = require(path.join(modules, 'js-to-java'));

function repeat(s, n) {
  return new Array(n + 1).join(s);
}

function bytes(n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + 3) & 0xff;
  return b;
}

function samples() {
  const s = [];
  const add = (name, ...values) => s.push([name, values]);
  add('null', null);
  add('true', true);
  add('false', false);
  for (const v of [0, 1, -1, -16, 47, 48, -17, -2048, 2047, 2048, -2049, -262144, 262143,
    262144, -262145, 2147483647, -2147483648]) {
    add('int_' + v, java.int(v));
  }
  for (const v of [0, -8, 15, 16, -9, -2048, 2047, 2048, -2049, -262144, 262143, 262144,
    -262145, 2147483647, -2147483648, 2147483648, -2147483649, 9007199254740991]) {
    add('long_' + v, java.long(v));
  }
  for (const v of [0.0, 1.0, -1.0, 127.0, -128.0, 128.0, 32767.0, 32768.0, 1.5, 0.1, 12.25,
    3.14159, 2147483.647, 1e10, 1e300, NaN, Infinity, -Infinity]) {
    add('double_' + v, java.double(v));
  }
  add('number_int', 42);
  add('number_frac', 2.75);
  add('str_empty', '');
  add('str_a', 'a');
  add('str_32', repeat('c', 32));
  add('str_1024', repeat('e', 1024));
  add('str_32769', repeat('g', 0x8001));
  add('str_latin', 'h\u00e9llo w\u00f6rld');
  add('str_cjk', '\u4e2d\u6587\u5b57\u7b26');
  add('str_emoji', 'a\ud83d\ude00b');
  add('str_mixed_40', repeat('\u00e9\u4e2d\ud83d\ude00x', 8));
  add('bin_0', Buffer.alloc(0));
  add('bin_15', bytes(15));
  add('bin_16', bytes(16));
  add('bin_1024', bytes(1024));
  add('date_0', new Date(0));
  add('date_ms', new Date(1600000000123));
  add('date_minute', new Date(1600000020000));
  add('list_empty', []);
  add('list_3', [java.int(1), 'two', java.double(3.5)]);
  add('list_8', [0, 1, 2, 3, 4, 5, 6, 7].map((x) => java.int(x)));
  add('array_int', java.array.int([1, 2, 3]));
  add('array_string', java.array('java.lang.String', ['a', 'b']));
  add('java_list', java.List([java.int(1), java.int(2)]));
  add('map_plain', { a: java.int(1), b: 'x' });
  add('hashmap', java('java.util.HashMap', { k: 'v' }));
  add('object', java('com.example.Person', { name: 'ann', age: java.int(30), id: java.long(7) }));
  add('objects_two', [
    java('com.example.Person', { name: 'a', age: java.int(1), id: java.long(1) }),
    java('com.example.Person', { name: 'b', age: java.int(2), id: java.long(2) }),
  ]);
  add('enum', java.enum('com.example.Color', 'RED'));
  add('stream_dubbo_like', '2.0.2', 'com.example.Svc', '1.0.0', 'sayHello',
    'Lcom/example/Person;',
    java('com.example.Person', { name: 'a', age: java.int(1), id: java.long(1) }),
    { path: 'com.example.Svc', timeout: '3000' });
  return s;
}

function utf16hex(str) {
  let out = '';
  for (let i = 0; i < str.length; i++) out += str.charCodeAt(i).toString(16).padStart(4, '0');
  return out;
}

function numhex(n) {
  const b = Buffer.alloc(8);
  b.writeDoubleBE(n);
  return b.toString('hex');
}

const SCALAR_CLASSES = new Set(['boolean', 'int', 'long', 'double', 'float', 'short', 'byte',
  'java.lang.Boolean', 'java.lang.Integer', 'java.lang.Long', 'java.lang.Double',
  'java.lang.String', 'java.lang.Short', 'java.lang.Float', 'java.lang.Byte']);

// Canonical description of what DecoderV2.read(true) returns. Map entries and object fields
// are sorted; a container met again on the current path is "@upN".
function describe(v, stack) {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'boolean') return String(v);
  if (typeof v === 'number') return 'num:' + numhex(v);
  if (typeof v === 'string') return 'str:' + utf16hex(v);
  if (Buffer.isBuffer(v)) return 'bin:' + v.toString('hex');
  if (v instanceof Date) return 'date:' + v.getTime();
  const up = stack.indexOf(v);
  if (up >= 0) return '@up' + (stack.length - up);
  stack.push(v);
  try {
    if (Array.isArray(v)) return 'list[' + v.map((x) => describe(x, stack)).join(',') + ']';
    if (v instanceof Map) {
      const items = [];
      for (const [k, x] of v) items.push(describe(k, stack) + '=' + describe(x, stack));
      return 'map{' + items.sort().join(',') + '}';
    }
    if (typeof v.$class === 'string' && '$' in v) {
      const cls = v.$class;
      const inner = v.$;
      if (SCALAR_CLASSES.has(cls)) return describe(inner, stack);
      if (Array.isArray(inner)) {
        return 'list(' + cls + ')[' + inner.map((x) => describe(x, stack)).join(',') + ']';
      }
      const items = Object.keys(inner).map((k) => k + '=' + describe(inner[k], stack));
      if (cls.endsWith('Map')) return 'map(' + cls + '){' + items.sort().join(',') + '}';
      return 'obj(' + cls + '){' + items.sort().join(',') + '}';
    }
    const items = Object.keys(v).map((k) => k + '=' + describe(v[k], stack));
    return 'map{' + items.sort().join(',') + '}';
  } finally {
    stack.pop();
  }
}

function encodeAll(values) {
  const enc = new hessian.EncoderV2();
  for (const v of values) enc.write(v);
  return enc.get();
}

function main() {
  const mode = process.argv[2];
  if (mode === 'encode') {
    const lines = samples().map(([name, values]) => name + '\t' + encodeAll(values).toString('hex'));
    process.stdout.write(lines.join('\n') + '\n');
  } else if (mode === 'decode') {
    let input = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (c) => { input += c; });
    process.stdin.on('end', () => {
      const out = [];
      for (const line of input.split('\n')) {
        if (!line) continue;
        const [name, count, hex] = line.split('\t');
        try {
          const dec = new hessian.DecoderV2(Buffer.from(hex, 'hex'));
          const descs = [];
          for (let i = 0; i < Number(count); i++) descs.push(describe(dec.read(true), []));
          out.push(name + '\tOK\t' + descs.join('|'));
        } catch (e) {
          out.push(name + '\tERR\t' + String(e && e.message).replace(/[\t\n]/g, ' '));
        }
      }
      process.stdout.write(out.join('\n') + '\n');
    });
  } else if (mode === 'bench') {
    const buf = Buffer.from(process.argv[3], 'hex');
    const n = Number(process.argv[4]);
    const count = Number(process.argv[5] || 1);
    const decodeAll = () => {
      const dec = new hessian.DecoderV2(buf);
      const out = [];
      for (let j = 0; j < count; j++) out.push(dec.read());
      return out;
    };
    // CPU time (user + system) of the best of 10 windows: fair on a shared, loaded machine
    const best = (fn) => {
      const per = Math.max(1, Math.floor(n / 10));
      let min = Infinity;
      for (let w = 0; w < 10; w++) {
        const t0 = process.cpuUsage();
        for (let i = 0; i < per; i++) fn();
        const t = process.cpuUsage(t0);
        min = Math.min(min, (t.user + t.system) / per);
      }
      return min;
    };
    let values = decodeAll();
    for (let i = 0; i < Math.min(n, 2000); i++) values = decodeAll();
    const dec = best(decodeAll);
    for (let i = 0; i < Math.min(n, 2000); i++) encodeAll(values);
    const enc = best(() => encodeAll(values));
    process.stdout.write(dec.toFixed(3) + '\t' + enc.toFixed(3) + '\n');
  } else {
    process.stderr.write('usage: hessian_driver.js encode|decode|bench HEX N\n');
    process.exit(2);
  }
}

main();
