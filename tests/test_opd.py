"""The whole script under torchrun on 2 ranks with tiny models: does OPD distill?"""

import json
import os
import re

import pytest

from conftest import PY, TORCHRUN, run_cmd

METRICS = ["step", "train/reverse_kl", "train/loss", "train/grad_norm", "train/is_ratio_mean",
           "train/clip_frac", "train/response_len", "teacher/default/reverse_kl",
           "timing/rollout_s", "timing/teacher_s", "timing/train_s", "timing/sync_s",
           "timing/step_s", "throughput/tokens_per_s", "memory/peak_rss_gib"]


def run_opd(tiny, out, *flags, teacher=None):
    args = [TORCHRUN, "--nproc_per_node=2", "opd.py", "--pretrain", tiny["student"],
            "--teacher.model_name_or_path", tiny["teacher"] if teacher is None else teacher,
            "--data.file_name", tiny["train"], "--output_dir", str(out),
            "--rollout_batch_size", "8", "--num_return_sequences_in_group", "4",
            "--response_length", "16", *flags]
    r = run_cmd(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return r, rows


def test_reverse_kl_falls_and_outputs_are_complete(tiny, tmp_path):
    out = tmp_path / "run"
    r, rows = run_opd(tiny, out, "--max_steps", "12", "--student_train.lr", "1e-2", "--save_steps", "6")
    kl = [row["train/reverse_kl"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, 13))  # no validation set: no step 0
    assert kl[0] > 1.0, kl                                  # a different teacher: real signal
    assert sum(kl[-3:]) / 3 < 0.75 * sum(kl[:2]) / 2, kl    # and the student closes the gap
    for row in rows:
        assert set(METRICS) <= set(row), set(METRICS) - set(row)
        assert 0.5 < row["train/is_ratio_mean"] < 2.0      # sampler and trainer agree (fp32)
    # the console line, TensorBoard events, the resolved config, both checkpoints
    assert "step   12/12 | kl" in r.stdout
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert "rollout_batch_size: 8" in (out / "config.yaml").read_text()
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_12", "step_6"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_12"

    # the checkpoint is an HF model that transformers and vLLM load as-is
    ckpt = str(out / "checkpoints" / "step_12")
    check = (
        "import os, sys; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']='0'\n"
        "import torch, transformers, vllm\n"
        "if __name__ == '__main__':\n"
        f"    m = transformers.AutoModelForCausalLM.from_pretrained({ckpt!r})\n"
        f"    s = transformers.AutoModelForCausalLM.from_pretrained({tiny['student']!r})\n"
        "    assert not torch.equal(m.lm_head.weight, s.lm_head.weight), 'checkpoint did not train'\n"
        f"    llm = vllm.LLM(model={ckpt!r}, dtype='float32', enforce_eager=True, max_model_len=64)\n"
        "    o = llm.generate([{'prompt_token_ids': [5, 6, 7]}], vllm.SamplingParams(max_tokens=4))\n"
        "    print('GENERATED', len(o[0].outputs[0].token_ids))\n")
    r = run_cmd([PY, "-c", check], env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert r.returncode == 0 and "GENERATED" in r.stdout, r.stderr[-3000:]


def test_teacher_equal_to_student_gives_zero_kl_from_a_yaml_config(tiny, tmp_path):
    # the YAML, verbatim but for the paths; the teacher is the student itself
    cfg = tmp_path / "it.yaml"
    cfg.write_text(f"""
pretrain: {tiny['student']}
teacher:
  model_name_or_path: {tiny['student']}
data:
  file_name: [{tiny['train']}]
rollout_batch_size: 4
num_return_sequences_in_group: 2
response_length: 16
max_steps: 3
output_dir: {tmp_path / 'same'}
seed: 0
""")
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "opd.py", "--config", str(cfg)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert abs(rows[0]["train/reverse_kl"]) < 1e-4, rows[0]
    assert abs(rows[0]["train/loss"]) < 1e-4, rows[0]


@pytest.mark.parametrize("mode", ["mixed", "plain_rl"])
def test_mixed_mode_and_plain_rl_runs_log_rewards_and_validation(tiny, tmp_path, mode):
    flags = ["--max_steps", "3", "--validation.file_name", tiny["train"], "--validation.eval_steps", "2",
             "--rewards.math.tag_included", "add", "sub"]
    if mode == "mixed":
        r, rows = run_opd(tiny, tmp_path / mode, *flags, "--use_opd", "--adv_estimator", "reinforce")
        assert "opd: mixed (RL + OPD)" in r.stdout
    else:
        r, rows = run_opd(tiny, tmp_path / mode, *flags, teacher="")
        assert "opd: plain RL" in r.stdout
    by_step = {row["step"]: row for row in rows}
    assert sorted(by_step) == [0, 1, 2, 3]
    for step in (0, 2, 3):  # before training, every eval_steps, after the last step
        assert 0.0 <= by_step[step]["val/accuracy"] <= 1.0
        assert {"val/add/accuracy", "val/sub/accuracy"} <= set(by_step[step])
    for step in (1, 2, 3):
        assert {"reward/add/mean", "reward/sub/mean", "train/loss"} <= set(by_step[step])
        has_teacher = "teacher/default/reverse_kl" in by_step[step]
        assert has_teacher == (mode == "mixed")
    assert re.search(r"val +0/3 \| accuracy [0-9.]+ \| add/accuracy", r.stdout)  # console line
    assert re.search(r"\[(add|sub)\] 'Compute .*' -> .* \(reward [01]\.00\)", r.stdout)  # examples


def test_off_policy_baseline_trains_on_the_teachers_samples(tiny, tmp_path):
    r, rows = run_opd(tiny, tmp_path / "off", "--off_policy", "--max_steps", "8", "--student_train.lr", "1e-2",
                      "--student_train.warmup_steps", "0")
    assert "opd: off-policy distillation (SFT on teacher samples)" in r.stdout
    nll = [row["train/loss"] for row in rows]
    assert nll[0] > 1.0, nll                                  # a random student, the teacher's text
    assert sum(nll[-2:]) / 2 < 0.85 * nll[0], nll             # SFT pulls the student onto it
    for row in rows:  # no ratio (the samples are not the student's), no teacher scoring pass
        assert row["train/is_ratio_mean"] == 1.0 and row["train/clip_frac"] == 0.0
        assert "teacher/default/reverse_kl" not in row and row["train/response_len"] >= 1


def test_teacher_data_file_then_off_policy_sft_from_it(tiny, tmp_path):
    """teacher_data.py samples the teacher's answers once with vLLM on 2 ranks (greedy here,
    so they must equal a plain HF greedy decode of the teacher); opd.py --off_policy then
    trains on that file and generates nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "td" / "data.jsonl"
    common = ["--pretrain", tiny["student"], "--teacher.model_name_or_path", tiny["teacher"],
              "--num_return_sequences_in_group", "2", "--response_length", "16", "--rollout_batch_size", "8"]
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "teacher_data.py", *common, "--data.file_name", tiny["train"],
                 "--student_infer.temperature", "0", "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"teacher data: 64 prompts x 2 answers, [0-9,]+ tokens sampled in", r.stdout), r.stdout
    assert "vLLM" not in r.stdout and (tmp_path / "td" / "logs" / "rank0.log").exists()  # quiet console
    src = [json.loads(line) for line in open(tiny["train"])]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == [x["id"] for x in src]  # every prompt, in input order
    cost = json.loads((tmp_path / "td" / "data.jsonl.json").read_text())
    assert cost["prompts"] == 64 and cost["answers"] == 128 and cost["sampling_s"] > 0
    assert cost["response_tokens"] == sum(len(a) for x in recs for a in x["teacher_completion_ids"])
    tok, teacher = tiny["tokenizer"], AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    for x in recs[:6]:
        answers = x["teacher_completion_ids"]
        assert len(answers) == 2 and answers[0] == answers[1] and 1 <= len(answers[0]) <= 16  # greedy
        assert x["teacher_completions"][0] == tok.decode(answers[0], skip_special_tokens=True)
        prompt = tok.apply_chat_template(x["messages"], add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt, list):
            prompt = prompt["input_ids"]
        ref = teacher.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        ref = ref.tolist()
        assert answers[0] == (ref[:ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref)

    r, rows = run_opd(tiny, tmp_path / "sft", "--off_policy", "--data.file_name", str(out), "--max_steps", "8",
                      "--student_train.lr", "1e-2", "--student_train.warmup_steps", "0",
                      "--num_return_sequences_in_group", "2")
    assert "64 prompts with the teacher's answers from the data files" in r.stdout
    nll = [row["train/loss"] for row in rows]
    assert nll[0] > 1.0 and sum(nll[-2:]) / 2 < 0.85 * nll[0], nll
    mean_len = sum(len(a) for x in recs for a in x["teacher_completion_ids"]) / 128
    assert all(abs(row["train/response_len"] - mean_len) < 6 for row in rows)


def test_distribution_level_kl_modes_on_2_ranks(tiny, tmp_path):
    """opd_kl_mode topk and full (issue 12): step 1 of both samples the same tokens (seeded
    requests, same initial student), so its top-k KL (k=4, with the rest bucket) is at most
    the full KL; with the student as its own teacher the full KL and its gradient are 0."""
    flags = ("--max_steps", "2", "--validation.eval_steps", "0")
    _, topk = run_opd(tiny, tmp_path / "topk", *flags, "--opd_kl_mode", "topk", "--opd_kl_topk", "4")
    _, full = run_opd(tiny, tmp_path / "full", *flags, "--opd_kl_mode", "full")
    assert topk[0]["train/reverse_kl"] == full[0]["train/reverse_kl"]  # the same rollout at step 1
    assert 0.01 < topk[0]["train/kl_topk"] <= full[0]["train/kl_full"] + 1e-6, (topk[0], full[0])
    assert all(r["train/grad_norm"] > 0 for r in topk + full)
    _, same = run_opd(tiny, tmp_path / "same", *flags, "--opd_kl_mode", "full", teacher=tiny["student"])
    assert abs(same[0]["train/kl_full"]) < 1e-6 and same[0]["train/grad_norm"] < 1e-5, same[0]
