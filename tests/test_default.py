"""The embedded default, fast: `opd.py` with no model, data or teacher flags, on the quick
toy world (same layout, barely trained models), a few steps and a small validation split.

Asserts the plumbing of the teaching run: the toy world is built on first use, the
teacher's accuracy is logged once per tag, the student's before and after, every step's
metrics are complete, and the console ends with the before/after table. That OPD
actually gets the student to 90% of the teacher is shown by `compare.py`, not here."""

import json
import os

import yaml

from conftest import TORCHRUN, run_cmd
from test_opd import METRICS

TAGS = ("add", "sub")


def test_default_run_builds_the_world_and_logs_teacher_and_student(tmp_path):
    import toy

    toy_dir = tmp_path / "toy"
    toy.prepare(str(toy_dir), quick=True)  # what opd.py would build, seconds instead of minutes
    os.remove(toy_dir / "student" / "model.safetensors")  # so opd.py must rebuild it itself
    os.remove(toy_dir / "DONE")
    out = tmp_path / "run"
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "opd.py", "--max_steps", "3",
                 "--validation.eval_steps", "2", "--output_dir", str(out)],
                env={"OPD_TOY_DIR": str(toy_dir), "OPD_TOY_QUICK": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert (toy_dir / "DONE").exists() and (toy_dir / "student" / "model.safetensors").exists()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["pretrain"] == str(toy_dir / "student") and cfg["off_policy"] is False
    assert list(cfg["teacher"]) == ["default"] and not cfg["use_opd"]  # pure OPD

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    first, last = rows[0], rows[-1]
    for tag in TAGS:  # the teacher, once, per tag; the student before, midway and after
        assert 0.0 <= first[f"val/{tag}/teacher_accuracy"] <= 1.0
        assert all(f"val/{tag}/teacher_accuracy" not in row for row in rows[1:])
        assert all(0.0 <= row[f"val/{tag}/accuracy"] <= 1.0 for row in (first, rows[2], last))
    assert "val/accuracy" not in rows[1]
    for row in rows[1:]:
        assert set(METRICS + ["timing/elapsed_s", "throughput/tokens_total"]) <= set(row), \
            set(METRICS) - set(row)
        assert {f"reward/{tag}/mean" for tag in TAGS} <= set(row)
    assert rows[1]["throughput/tokens_total"] < rows[2]["throughput/tokens_total"] < last["throughput/tokens_total"]
    assert rows[1]["timing/elapsed_s"] < last["timing/elapsed_s"]

    # the console: one progress line per step, then the before/after table
    assert sum(line.startswith("step ") for line in r.stdout.splitlines()) == 3
    table = r.stdout[r.stdout.index("validation accuracy, before and after"):].splitlines()
    assert table[1].split() == ["tag", "teacher", "student@0", "student@3"]
    row = dict((line.split()[0], line.split()[1:]) for line in table[2:5])
    assert set(row) == {*TAGS, "all"}
    assert float(row["all"][0]) == round(first["val/teacher_accuracy"], 3)
    assert float(row["all"][2]) == round(last["val/accuracy"], 3)
