"""The demo's Thrift service, loaded with thriftpy2 from an IDL kept in this module."""

from __future__ import annotations

import importlib
import io
from functools import cache
from typing import Any

HELLO_THRIFT = """\
namespace py hello

exception HelloError {
  1: string message
}

service Hello {
  string sayHello(1: string name)
  string ping()
  string sleep(1: i32 ms)
  string headers()
  oneway void notify(1: string event)
  i32 notified()
  string fail(1: string message) throws (1: HelloError error)
}
"""


@cache
def hello() -> Any:
    """The thriftpy2 module for :data:`HELLO_THRIFT` (``hello().Hello`` is the service)."""
    import thriftpy2

    return thriftpy2.load_fp(io.StringIO(HELLO_THRIFT), module_name="hello_thrift")


def untyped(module: str) -> Any:
    """Import ``module`` as ``Any``: thriftpy2 ships partial annotations that strict mypy
    rejects at every call site."""
    return importlib.import_module(module)
