"""Thrift reference codec for the MetaProtocol codec SDK."""
