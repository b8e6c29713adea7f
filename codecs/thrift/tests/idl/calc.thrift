// Test service for the Thrift codec's real-peer tests (thriftpy2 loads it; Apache's
// compiler generates Python code from it at test-session start).
namespace py calc_gen

exception CalcError {
  1: i32 code,
  2: string reason,
}

struct Leaf {
  1: i16 small,
  2: double ratio,
  3: bool flag,
  4: binary blob,
}

struct Item {
  1: i64 id,
  2: string name,
  3: list<i32> values,
  4: map<string, string> tags,
  5: set<i64> marks,
  6: list<Leaf> leaves,
  7: map<i32, Leaf> by_id,
  8: list<list<string>> grid,
  9: byte tiny,
}

service Calculator {
  i32 add(1: i32 a, 2: i32 b),
  string echo(1: string text),
  Item roundtrip(1: Item item),
  i32 divide(1: i32 a, 2: i32 b) throws (1: CalcError err),
  oneway void notify(1: string event),
  void ping(),
}

// A newer client's view: `multiply` is unknown to servers of `Calculator`, which answer
// with a TApplicationException (an EXCEPTION message) - used to capture one.
service CalculatorV2 extends Calculator {
  i32 multiply(1: i32 a, 2: i32 b),
}
