"""The capacity benchmark's own logic: parsing its options and the summary over fact sets."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def capacity():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their `common` module
    try:
        yield importlib.import_module("capacity")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_seed_list_parses_and_names_bad_values(capacity):
    assert capacity.seed_list("7,8,9") == [7, 8, 9]
    for bad in ("7,x", "", "7,7"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            capacity.seed_list(bad)


def test_batch_size_is_a_positive_integer(capacity):
    assert capacity.batch_size("20") == 20
    for bad in ("0", "-5", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            capacity.batch_size(bad)


def test_summary_gives_mean_min_max_per_checkpoint(capacity):
    def run(*values):
        return {"rows": [{"facts": n, **{m: v for m in capacity.METRICS}} for n, v in zip((5, 10), values)]}

    out = capacity.summary([run(1.0, 0.5), run(0.5, 0.25), run(0.75, 0.0)])
    assert [r["facts"] for r in out] == [5, 10]
    assert out[0]["raw_recall"] == {"mean": 0.75, "min": 0.5, "max": 1.0}
    assert out[1]["locality"] == {"mean": 0.25, "min": 0.0, "max": 0.5}


def test_memit_setting_parses_by_field_type_and_names_bad_values(capacity):
    assert capacity.memit_setting("clamp_norm_factor=0.5") == ("clamp_norm_factor", 0.5)
    assert capacity.memit_setting("v_steps=60") == ("v_steps", 60)
    assert capacity.memit_setting("chat_edit=false") == ("chat_edit", False)
    for bad, named in (("nosuch=1", "nosuch=1"), ("v_steps", "v_steps"), ("v_steps=1.5", "1.5"),
                       ("chat_edit=maybe", "maybe"), ("layers=4", "layers=4")):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(named)):
            capacity.memit_setting(bad)


def test_a_setting_the_config_refuses_is_a_usage_error_before_any_work():
    import subprocess

    proc = subprocess.run([sys.executable, str(BENCHMARKS / "capacity.py"), "--set", "lambda_reg=-1"],
                          capture_output=True, text=True, cwd=BENCHMARKS, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "lambda_reg must be > 0" in proc.stderr and "Traceback" not in proc.stderr


def test_sleep_benchmark_names_an_unknown_model_as_a_usage_error(tmp_path):
    import subprocess

    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "sleep.py"), "nap10", "--model", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
