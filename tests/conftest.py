"""Hypothesis profiles: ``ci`` (default), ``nightly``, ``dev`` and ``mutation`` (bench/mutation.py);
pick one with HYPOTHESIS_PROFILE.

Property tests that do not fix ``max_examples`` themselves (the random-graph
equivalence suite) take it from the profile: ``ci`` runs 1,000 random graphs per run,
``nightly`` 20,000.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=1000, **COMMON)
settings.register_profile("nightly", max_examples=20000, **COMMON)
settings.register_profile("dev", max_examples=100, **COMMON)
# bench/mutation.py: every run draws the same examples and replays none from .hypothesis/,
# so a mutant's verdict depends on the mutant alone.
settings.register_profile("mutation", max_examples=50, derandomize=True, database=None, **COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The composed fuzzer runs in a child process (tests/test_fuzz_isolated.py), so that an
# onnxruntime crash cannot end the whole run; set BNFOLD_FUZZ_IN_PROCESS=1 to collect it here.
collect_ignore = [] if os.environ.get("BNFOLD_FUZZ_IN_PROCESS") else ["test_fuzz.py"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The exporter corpus (tests/corpus.py), each model exported once per session and
    shared by the test files that use it (exporting it all takes about a minute)."""
    import corpus as C

    return C.Corpus(tmp_path_factory.mktemp("corpus"))
