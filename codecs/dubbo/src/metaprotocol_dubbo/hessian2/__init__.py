"""Hessian 2.0 serialization, as Dubbo uses it, in pure Python.

Decoding (:class:`Decoder`, :func:`loads`) maps Hessian values to plain Python:

=====================  ==========================================================
Hessian                Python
=====================  ==========================================================
null                   ``None``
boolean                ``bool``
int, long              ``int``
double                 ``float``
string                 ``str`` (surrogate pairs joined; lone surrogates kept)
binary                 ``bytes``
date                   ``datetime`` (UTC, aware)
untyped list           ``list``
typed list             :class:`TypedList` (``.type``, ``.variable``)
untyped map            ``dict``
typed map              :class:`TypedMap` (``.type``)
object                 :class:`JavaObject` (``.type``, fields as dict items)
=====================  ==========================================================

Encoding (:class:`Encoder`, :func:`dumps`) maps back: ``int`` is a Java int when it fits 32
bits, else a long; ``float`` is a double; ``tuple`` is a list; naive ``datetime`` is UTC.
:class:`JavaInt`, :class:`JavaLong`, :class:`JavaFloat`, :class:`JavaDouble` force a Java type.
"""

from .decoder import (
    DEFAULT_MAX_CLASSES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_REFS,
    Decoder,
    loads,
)
from .encoder import Encoder, dumps
from .errors import HessianError
from .types import JavaDouble, JavaFloat, JavaInt, JavaLong, JavaObject, TypedList, TypedMap

__all__ = [
    "DEFAULT_MAX_CLASSES",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MAX_REFS",
    "Decoder",
    "Encoder",
    "HessianError",
    "JavaDouble",
    "JavaFloat",
    "JavaInt",
    "JavaLong",
    "JavaObject",
    "TypedList",
    "TypedMap",
    "dumps",
    "loads",
]
