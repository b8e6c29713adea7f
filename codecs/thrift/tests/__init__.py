"""Thrift codec tests.

A package on purpose: under pytest's importlib mode, test modules here are then named
``tests.*``. Without it they would be named ``codecs.thrift.tests.*``, and pytest would register
this repository's ``codecs/`` folder in place of the standard-library ``codecs`` module.
"""
