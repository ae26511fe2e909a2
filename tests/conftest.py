"""Shared test setup.

Hypothesis profiles: "ci" (chosen when the CI environment variable is set) is derandomized, so
every run tries the same examples and a failure reproduces; "dev" explores randomly.
Set HYPOTHESIS_PROFILE to pick one explicitly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Triton picks its interpreter when kernels are defined (at import); without a GPU the tests
# need it, and nothing may import triton before this is set.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
