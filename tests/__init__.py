"""
synkeys' trial suite.

Property-based tests draw fresh examples on every run by default, so
developers keep exploring. ``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``)
derandomizes them, so that the gate is reproducible: a failure seen in CI
is seen again on any machine with the same profile.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
