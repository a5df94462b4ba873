"""compare.py's bookkeeping: the 90%-of-teacher crossing, the table, the plot."""

import compare


def rows(accs, step_s=0.5, tokens=1000, eval_steps=10):
    """metrics.jsonl rows of a run validated every `eval_steps` with accuracies `accs`."""
    out = [{"step": 0, "val/accuracy": accs[0], "val/teacher_accuracy": 0.9}]
    for step in range(1, eval_steps * (len(accs) - 1) + 1):
        row = {"step": step, "timing/elapsed_s": step * step_s, "throughput/tokens_total": step * tokens}
        if step % eval_steps == 0:
            row["val/accuracy"] = accs[step // eval_steps]
        out.append(row)
    return out


def test_summary_finds_the_first_validation_at_90_percent_of_the_teacher():
    s = compare.summarize(rows([0.3, 0.5, 0.82, 0.7, 0.85]), teacher_acc=0.9)
    assert (s["start"], s["final"], s["best"]) == (0.3, 0.85, 0.85)
    assert s["step90"] == 20 and s["s90"] == 10.0 and s["tok90"] == 20000   # 0.82 >= 0.81, not 0.5
    assert (s["steps"], s["seconds"], s["tokens"]) == (40, 20.0, 40000)
    never = compare.summarize(rows([0.3, 0.5, 0.6]), teacher_acc=0.9)
    assert never["step90"] is None and never["s90"] is None


def test_table_and_plot(tmp_path):
    runs = {"opd": rows([0.3, 0.85]), "rl": rows([0.3, 0.4], step_s=0.25)}
    results = {m: compare.summarize(r, 0.9) for m, r in runs.items()}
    text = compare.table(results, 0.9, {"opd": 12.0, "rl": 8.0})
    lines = text.splitlines()
    assert "0.900" in lines[0] and "0.810" in lines[0]
    opd, rl = lines[4].split("|"), lines[5].split("|")
    assert opd[1].strip() == compare.LABELS["opd"] and opd[5].strip() == "10" and opd[-2].strip() == "12"
    assert rl[5].strip() == "not reached" and rl[3].strip() == "0.400"
    png = tmp_path / "c.png"
    compare.plot(runs, 0.9, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_agentic_runs_are_scored_by_validation_success():
    success = [{**r, "val/success": r.pop("val/accuracy")} for r in rows([0.2, 0.6, 0.9]) if "val/accuracy" in r]
    s = compare.summarize(success, teacher_acc=0.95, key="val/success")
    assert (s["start"], s["final"], s["step90"]) == (0.2, 0.9, 20)
    assert "validation success" in compare.table({"opd": s}, 0.95, {"opd": 1.0}, "success").splitlines()[0]
