"""bench_peers.py's bookkeeping: warm-up steps left out, tokens/s per run, the ratio to TRL.

(The benchmark itself needs TRL's own venv and minutes of runs: it is run by hand.)"""

import bench_peers


def step(step_s, tokens=100, gen_s=0.0):
    return {"step_s": step_s, "gen_s": gen_s, "teacher_s": 0.0, "train_s": 0.0, "sync_s": 0.0,
            "tokens": tokens}


def test_summary_drops_warmup_and_takes_tokens_per_second_per_run():
    runs = [[step(9.0), step(1.0, gen_s=0.25), step(1.0, gen_s=0.25)],   # 200 tokens in 2 s
            [step(9.0), step(0.5, gen_s=0.5), step(0.5, gen_s=0.5)]]     # 200 tokens in 1 s
    s = bench_peers.summarize(runs, warmup=1)
    assert s["steps"] == 4                       # the 9 s warm-up steps are left out
    assert (s["tps_min"], s["tps_max"]) == (100.0, 200.0)
    assert s["tps"] == 150.0 and s["step"] == 0.75
    assert s["gen_s"] == 0.375 and s["other_s"] == 0.375


def test_table_reports_each_system_against_trl(capsys):
    fast = {"runs": [[step(1.0), step(0.5), step(0.5)]], "foreign": [0.0], "wall": [1.0]}
    slow = {"runs": [[step(1.0), step(1.0), step(1.0)]], "foreign": [0.0], "wall": [1.0]}
    bench_peers.table("tiny", {"opd (1 rank x 2 threads)": fast, bench_peers.TRL: slow}, warmup=1, steps=3)
    lines = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ")}
    assert lines["opd (1 rank x 2 threads)"].endswith("| 2.00x |")
    assert lines[bench_peers.TRL].endswith("| 1.00x |")
