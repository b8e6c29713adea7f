"""``python -m metaprotocol_sdk`` is the ``metaprotocol`` command."""

from metaprotocol_sdk.cli import main

main()
