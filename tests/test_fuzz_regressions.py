"""Failures the composed fuzzer (tests/test_fuzz.py) found, replayed from their shrunk
recipes (the hand-minimised ones are in tests/test_regressions.py, "Found by the
composed fuzzer")."""

import pytest
import test_fuzz
from test_fuzz import check_recipe


@pytest.fixture(autouse=True)
def _no_hypothesis_events(monkeypatch):
    """check_recipe records hypothesis statistics, which only exist inside a @given test."""
    monkeypatch.setattr(test_fuzz, "event", lambda *args, **kwargs: None)


def test_bn_epsilon_referenced_from_call_sites_that_disagree(tmp_path):
    """A BN in a function whose epsilon comes from a function attribute that its two call
    sites set differently: kept ("attribute-reference"), and its readiness is not judged
    against an epsilon nobody can name (was: TypeError, exit 3)."""
    check_recipe({
        "ir": 9, "opset": 17, "dtype": "float16", "seed": 300, "input": [2, 1, 4], "dynamic_batch": False,
        "steps": [
            {"op": "func", "body": [
                {"op": "bn", "stats": "normal", "eps": 1e-05, "ref": ["epsilon"], "param_dtype": "float16",
                 "tap": None},
                {"op": "unsqueeze", "axes": [3], "tap": None},
                {"op": "conv", "dims": 2, "cout": 1, "group": 1, "k": [1, 1], "stride": 1, "dilation": 1,
                 "pads": [0, 0, 0, 0], "auto_pad": "SAME_LOWER", "explicit_pads": False, "bias": False,
                 "w_bad": None, "twin": False, "ref": [], "tap": None}],
             "calls": 2, "vary": True, "params": "const", "defaults": False, "forward": False, "tap": None},
            {"op": "relu", "tap": None},
            {"op": "identity", "tap": None},
            {"op": "bn", "stats": "normal", "eps": 1e-05, "ref": [], "param_dtype": "float16", "tap": None}],
        "params": "init", "value_info": "full", "output_shapes": False, "overridable": False, "share": False,
        "names": "unique", "encoding": "canonical", "cond": False, "flags": {}}, tmp_path)
