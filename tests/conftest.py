"""Shared test configuration: reproducible property tests on CI, a thorough profile by hand."""

import os

from hypothesis import settings

settings.register_profile("default", max_examples=50, deadline=None)
# CI runs the same examples every time; local runs explore new ones.
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True)
# `pytest --hypothesis-profile=thorough` before a release.
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")
