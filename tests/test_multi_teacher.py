"""Several teachers: placement (disjoint or shared ranks) must not change what they score."""

import json

import pytest

from conftest import TORCHRUN, run_cmd


@pytest.mark.parametrize("nproc", [2, 4])
def test_disjoint_and_overlapping_placements_score_the_same(tiny, tmp_path, nproc):
    out = tmp_path / "scores.json"
    r = run_cmd([TORCHRUN, f"--nproc_per_node={nproc}", "tests/teachers_worker.py",
                 tiny["teacher"], tiny["student"], str(out)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["max_diff_math"] < 1e-5 and d["max_diff_general"] < 1e-5, d
    assert d["same_ids"] and d["routing_ok"], d
