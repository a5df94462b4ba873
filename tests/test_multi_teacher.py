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
    assert d["max_diff_topk"] < 1e-5 and d["topk_shape_ok"], d  # top-k moved between groups = in place
    assert d["same_ids"] and d["routing_ok"], d
    assert d["greedy_matches_hf"], d


def test_two_teachers_on_their_own_ranks_train_and_report(tiny, tmp_path):
    cfg = tmp_path / "two.yaml"
    cfg.write_text(f"""
pretrain: {tiny['student']}
teacher:
  math: {{model_name_or_path: {tiny['teacher']}, tag_included: [add], device_mapping: [0]}}
  general: {{model_name_or_path: {tiny['teacher']}, opd_kl_coef: 0.5, device_mapping: [1]}}
data: {{file_name: [{tiny['train']}]}}
rollout_batch_size: 8
max_steps: 2
output_dir: {tmp_path / 'run'}
tag_to_template: {{sub: qwen3_nothink}}
""")
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "opd.py", "--config", str(cfg)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0.0 < row["teacher/math/routed_frac"] < 1.0 and row["teacher/general/routed_frac"] == 1.0
        assert row["timing/teacher/math_s"] > 0 and row["timing/teacher/general_s"] > 0
        # the weighted total: math on its routed share, general (coef 0.5) on everything
        total = (row["teacher/math/routed_frac"] * row["teacher/math/reverse_kl"]
                 + 0.5 * row["teacher/general/reverse_kl"])
        assert abs(row["train/reverse_kl"] - total) < 0.15 * abs(total), (row, total)
