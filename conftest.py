"""Settings for the whole suite (this file is found for every test path under the checkout).

Hypothesis runs derandomized (a fixed seed per test) and without its example database, as the
conformance kit's own runs are: a CI run and a local run try the same inputs, a failure
reproduces from the test's name alone, and no ``.hypothesis/`` folder is left behind. Set
``HYPOTHESIS_PROFILE=explore`` to search new inputs (random seeds, still no database).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

# ``peer_check`` (what a test does when a real peer is missing) for every test module.
sys.path.insert(0, str(Path(__file__).parent / "tests"))

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
