"""compare.py's bookkeeping: the 90%-of-teacher crossing, the seed aggregates, the
verdict against SFT, the table, the plot."""

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


def test_seeds_aggregate_to_mean_and_range_over_the_seeds_that_reached_the_target():
    seeds = [rows([0.3, 0.82, 0.9]), rows([0.3, 0.5, 0.85], step_s=1.0), rows([0.3, 0.4, 0.5])]
    a = compare.aggregate([compare.summarize(r, 0.9) for r in seeds])
    assert (a["n"], a["reached"]) == (3, 2)
    assert a["step90"] == [10, 20] and a["s90"] == [5.0, 20.0] and a["final"] == [0.9, 0.85, 0.5]
    assert compare.spread(a["s90"], ".1f") == "12.5 (5.0-20.0)" and compare.spread([7], "d") == "7"
    line = compare.table({"opd": a}, 0.9).splitlines()[4].split("|")
    assert line[1].strip() == compare.LABELS["opd"] and line[2].strip() == "3"
    assert line[5].strip() == "2/3" and line[6].strip() == "15 (10-20)" and line[7].strip() == "12 (5-20)"
    assert line[4].strip() == "0.750 (0.500-0.900)"


def test_verdict_compares_the_best_opd_variant_with_sft_on_steps_and_time():
    agg = lambda *runs: compare.aggregate([compare.summarize(r, 0.9) for r in runs])
    fast_steps_slow_time = agg(rows([0.3, 0.85], step_s=2.0), rows([0.3, 0.85], step_s=2.0))
    sft = agg(rows([0.3, 0.5, 0.85], step_s=0.25), rows([0.3, 0.5, 0.85], step_s=0.25))
    v = compare.verdict({"opd_topk": fast_steps_slow_time, "off_policy": sft})
    assert "top-64 KL 10 vs off-policy SFT 20 (OPD ahead)" in v and "20 s vs off-policy SFT 5 s (SFT ahead" in v
    not_all = agg(rows([0.3, 0.85]), rows([0.3, 0.4]))  # one seed missed: it does not count
    assert "No OPD variant" in compare.verdict({"opd": not_all, "off_policy": sft})
    assert compare.verdict({"opd": not_all}) == ""


def test_table_and_plot_with_seed_bands(tmp_path):
    runs = {"opd": [rows([0.3, 0.85]), rows([0.3, 0.8])], "rl": [rows([0.3, 0.4], step_s=0.25)]}
    results = {m: compare.aggregate([compare.summarize(r, 0.9) for r in seeds]) for m, seeds in runs.items()}
    lines = compare.table(results, 0.9).splitlines()
    assert "0.900" in lines[0] and "0.810" in lines[0]
    rl = lines[5].split("|")
    assert rl[6].strip() == "not reached" and rl[4].strip() == "0.400" and rl[9].strip() == "0.25"
    png = tmp_path / "c.png"
    compare.plot(runs, 0.9, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_agentic_runs_are_scored_by_validation_success():
    success = [{**r, "val/success": r.pop("val/accuracy")} for r in rows([0.2, 0.6, 0.9]) if "val/accuracy" in r]
    s = compare.summarize(success, teacher_acc=0.95, key="val/success")
    assert (s["start"], s["final"], s["step90"]) == (0.2, 0.9, 20)
    text = compare.table({"opd": compare.aggregate([s])}, 0.95, "success")
    assert "validation success" in text.splitlines()[0] and "start success" in text.splitlines()[2]
