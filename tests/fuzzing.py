"""The fuzz tests' Hypothesis settings: bounded and derandomized, so CI is stable; raise
``FUZZ_EXAMPLES`` locally for a longer hunt (``FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_parsers.py``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
