"""Conformance material for the MetaProtocol conformance kit.

``golden*.yaml`` (when present) holds frames captured from real Thrift peers and what the
codec must decode from them; :mod:`.strategies` generates calls, oneway calls, replies and
exceptions across the binary and compact protocols and the framed, unframed and THeader
transports.
"""
