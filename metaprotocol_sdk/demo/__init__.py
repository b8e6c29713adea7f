"""The demo: real Thrift and Dubbo servers, real clients and the engine in between.

``metaprotocol demo`` (see :mod:`metaprotocol_sdk.demo.run`) starts two versions of each
server, routes with the two classic Aeraki ``MetaRouter`` examples (method ``sayHello`` to
subset v2; a 20/80 split between v1 and v2 for the rest) and shows live counts.
"""
