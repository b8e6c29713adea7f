"""The codec under test and everything the kit drives it with.

:class:`CodecTarget` bundles the codec class, its options, golden vectors, the author's
message strategy, known failures and the kit's settings. :meth:`CodecTarget.discover` fills
whatever the caller does not pass from the codec's shipped conformance package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.registry import load_codec

from .discovery import Shipped, find_shipped
from .golden import GoldenFile, Sample, load_golden
from .hooks import Grown, find_hooks

#: Mutation the round-trip checks write when the author names none.
DEFAULT_MUTATION: Mapping[str, str] = {"x-mp-conformance": "mutated", "x-mp-kit": "2"}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default


@dataclass(frozen=True)
class KitSettings:
    """How hard the kit pushes. Defaults keep one codec's full run to a few seconds.

    Hypothesis runs are derandomized (a fixed seed per check) so CI is deterministic; set
    ``derandomize=False`` (or ``METAPROTOCOL_KIT_DERANDOMIZE=0``) to explore new inputs, and
    ``METAPROTOCOL_KIT_EXAMPLES`` to raise the example counts.
    """

    #: Hypothesis examples per property check.
    examples: int = field(default_factory=lambda: _env_int("METAPROTOCOL_KIT_EXAMPLES", 20))
    #: Hypothesis examples for the random-bytes check.
    random_examples: int = field(
        default_factory=lambda: 3 * _env_int("METAPROTOCOL_KIT_EXAMPLES", 40)
    )
    #: Use a fixed seed for every hypothesis run.
    derandomize: bool = field(
        default_factory=lambda: os.environ.get("METAPROTOCOL_KIT_DERANDOMIZE", "1") != "0"
    )
    #: Longest a single decode call on bad input may take, in seconds.
    time_limit: float = 1.0
    #: The small ``max_frame_size`` used for random-bytes input.
    small_limit: int = 64
    #: Frames longer than this get sampled split points instead of every one.
    max_split_points: int = 600
    #: Seconds spent measuring each of decode and encode throughput.
    perf_seconds: float = 0.2
    #: Most four times the input may cost over the original in ``perf_linear`` (linear is 4,
    #: quadratic 16; the margin absorbs cache effects and a busy machine).
    linear_limit: float = 8.0
    #: The smaller size ``perf_linear`` measures: ``grown(n)``, ``n`` mutation keys.
    linear_scale: int = 256


@dataclass
class CodecTarget:
    """Everything the checks need about one codec."""

    codec: type[Codec]
    options: Mapping[str, Any] = field(default_factory=dict)
    golden: tuple[Sample, ...] = ()
    messages: st.SearchStrategy[Sample] | None = None
    known_failures: Mapping[str, str] = field(default_factory=dict)
    mutation: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_MUTATION))
    #: The bytes a mutation must never change (default: ``metadata.body``). Codecs whose
    #: mutable attachments live inside the body (Dubbo) ship one that leaves them out.
    payload: Callable[[Metadata], bytes | memoryview] | None = None
    settings: KitSettings = field(default_factory=KitSettings)
    #: Valid frames with unusual but legal content that ``encode`` must keep byte for byte.
    unusual: st.SearchStrategy[Sample] | None = None
    #: ``grown(n)``: named valid frames whose size grows in proportion to ``n``.
    grown: Grown | None = None
    #: What this target cannot cover (no golden vectors, no strategy, ...).
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The codec's display name."""
        where = f"{self.codec.__module__}:{self.codec.__qualname__}"
        return f"{self.codec.protocol} ({where})" if self.codec.protocol else where

    @property
    def samples(self) -> tuple[Sample, ...]:
        """Golden vectors that hold a valid message (bad-input vectors excluded)."""
        return tuple(s for s in self.golden if not s.is_bad_input)

    def new_codec(self, options: Mapping[str, Any] | None = None, **overrides: Any) -> Codec:
        """A fresh codec: target options, then ``options``, then keyword overrides."""
        return self.codec.from_options({**self.options, **(options or {}), **overrides})

    @classmethod
    def discover(
        cls,
        codec: type[Codec] | str,
        *,
        options: Mapping[str, Any] | None = None,
        golden: str | Path | GoldenFile | Sequence[Sample] | None = None,
        messages: st.SearchStrategy[Any] | None = None,
        known_failures: Mapping[str, str] | None = None,
        mutation: Mapping[str, str] | None = None,
        payload: Callable[[Metadata], bytes | memoryview] | None = None,
        settings: KitSettings | None = None,
        conformance: str | None = None,
        unusual: st.SearchStrategy[Any] | None = None,
        grown: Grown | None = None,
    ) -> CodecTarget:
        """Build a target; anything not given comes from the codec's conformance package.

        ``codec`` is a class, an installed codec name or a ``module:Class`` reference.
        ``messages`` is a strategy of frame ``bytes`` or of :class:`Sample`.
        ``conformance`` names the package to load instead of the discovered one.
        ``unusual`` (a strategy of unusual but legal frames) and ``grown`` (see
        :mod:`~metaprotocol_sdk.testing.hooks`) default to the package's hooks.
        """
        codec_cls = load_codec(codec) if isinstance(codec, str) else codec
        shipped = find_shipped(codec_cls, conformance)
        hooks = find_hooks(codec_cls, conformance)
        unusual = unusual if unusual is not None else hooks.unusual
        notes = list(shipped.notes)
        golden_file_options: Mapping[str, Any] = {}
        vectors: tuple[Sample, ...]
        if golden is None:
            vectors = shipped.vectors
            golden_file_options = shipped.options
        elif isinstance(golden, GoldenFile):
            vectors, golden_file_options = golden.vectors, golden.options
        elif isinstance(golden, str | Path):
            loaded = load_golden(golden)
            vectors, golden_file_options = loaded.vectors, loaded.options
        else:
            vectors = tuple(golden)
        strategy = messages if messages is not None else shipped.messages
        if not vectors:
            notes.append(
                "no golden vectors: nothing checks decoding against captured real-world frames"
            )
        if strategy is None:
            notes.append(
                "no message strategy: property checks run on golden vectors only"
                if vectors
                else "no message strategy and no golden vectors: only the generic random-bytes "
                "check runs; every check that needs a valid message is skipped"
            )
        return cls(
            codec=codec_cls,
            options=dict(options if options is not None else golden_file_options),
            golden=vectors,
            messages=None if strategy is None else as_samples(strategy),
            known_failures=dict(
                known_failures if known_failures is not None else shipped.known_failures
            ),
            mutation=dict(mutation or shipped.mutation or DEFAULT_MUTATION),
            payload=payload or shipped.payload,
            settings=settings or KitSettings(),
            unusual=None if unusual is None else as_samples(unusual),
            grown=grown or hooks.grown,
            notes=notes,
        )


def _to_sample(value: Any) -> Sample:
    if isinstance(value, Sample):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return Sample(frame=bytes(value))
    raise ConfigError(
        f"a message strategy must produce bytes or Sample, got {type(value).__name__}"
    )


def as_samples(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Sample]:
    """Normalise an author's strategy of ``bytes`` or :class:`Sample` to samples."""
    return strategy.map(_to_sample)


__all__ = ["DEFAULT_MUTATION", "CodecTarget", "KitSettings", "Shipped", "as_samples"]
