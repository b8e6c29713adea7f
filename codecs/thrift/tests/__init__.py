"""Thrift codec tests (a package so pytest names modules tests.*, not codecs.*)."""
