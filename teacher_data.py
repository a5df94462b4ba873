"""The off-policy baseline's dataset: the teacher's answers to every training prompt,
sampled once, up front, with vLLM.

    torchrun --nproc_per_node=2 teacher_data.py --config configs/long_toy.yaml --out runs/teacher-data/long.jsonl
    torchrun --nproc_per_node=2 opd.py --config configs/long_toy.yaml --off_policy \\
        --data.file_name runs/teacher-data/long.jsonl

Off-policy distillation (SFT on the teacher's samples) then trains without generating
anything, and the teacher's sampling cost is counted once, on its own line (here
and in `<out>.json`), the way a distillation dataset is made in practice. (Without
such a file, `--off_policy` has the teacher decode each step's answers itself with
`teachers.generate`: plain PyTorch, no vLLM, far slower.)

Takes opd.py's flags and presets: the teacher (`--teacher.model_name_or_path`; exactly
one), the prompts (`--data.file_name`, templates, `prompt_length`),
`num_return_sequences_in_group` answers per prompt of at most `response_length` tokens,
the sampler (`student_infer.temperature / top_p / top_k / dtype`) and `seed`. Every
rank samples its share (the prompts i with i % world == rank) on its own vLLM engine
holding the teacher; rank 0 writes `--out`: every input record, in input order, with

    "teacher_completions":    [answer text, ...]           (for people)
    "teacher_completion_ids": [[token id, ..., eos], ...]  (what SFT trains on; eos
                                                            only where the answer ended)

and `<out>.json`: prompts, answers, tokens, engine start-up and sampling seconds.
Prompts too long for `prompt_length` are left out, as training would skip them. The
file is written to `<out>.tmp` and renamed, so a killed run leaves no partial dataset.
"""

import json
import os
import sys
import time

import torch.distributed as dist

import config
import data
import logs
import rollout
import toy
import toy_long

FIELDS = ("teacher_completions", "teacher_completion_ids")


def sample_answers(cfg, rank, world):
    """This rank's [(input index, record, [answer ids, ...])], its seconds (start-up,
    sampling), the tokenizer and the engine (kept alive: its shutdown ends the process group)."""
    from transformers import AutoTokenizer

    (_, tc), = cfg.teacher.items()
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrain)  # prompts rendered exactly as training renders them
    items, notes = data.load_prompts(cfg.data.file_name, tokenizer, cfg.prompt_length, cfg.global_template,
                                     cfg.tag_to_template)
    if rank == 0:
        for note in notes:
            logs.banner(f"teacher data: {note}")
    mine = [(i, it) for i, it in enumerate(items) if i % world == rank]
    si = cfg.student_infer
    t0 = time.perf_counter()
    llm = rollout.make_engine(tc.model_name_or_path, dtype=si.dtype, seed=cfg.seed,
                              max_model_len=cfg.prompt_length + cfg.response_length,
                              gpu_memory_utilization=si.gpu_memory_utilization,
                              enforce_eager=si.enforce_eager, kv_cache_gib=si.kv_cache_gib)
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    G = cfg.num_return_sequences_in_group
    n = G if si.temperature > 0 else 1  # greedy: one answer, repeated G times (vLLM wants n=1)
    batch = rollout.generate(llm, [ids for _, (ids, _) in mine], [""] * len(mine), n=n,
                             max_tokens=cfg.response_length, temperature=si.temperature, top_p=si.top_p,
                             top_k=si.top_k, pad_id=tokenizer.pad_token_id or 0,
                             seed_key=("teacher-data", cfg.seed, rank))
    t_sample = time.perf_counter() - t0
    answers = batch.response_ids()
    rows = [(i, rec, (answers[j * n:(j + 1) * n] * G)[:G]) for j, (i, (_, rec)) in enumerate(mine)]
    return rows, (t_start, t_sample), tokenizer, llm


def write(out, rows, tokenizer):
    """The dataset, atomically: records in input order with the teacher's answers added."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for _, rec, answers in sorted(rows, key=lambda r: r[0]):
            rec = {k: v for k, v in rec.items() if k != "_where" and k not in FIELDS}
            rec[FIELDS[0]] = tokenizer.batch_decode(answers, skip_special_tokens=True)
            rec[FIELDS[1]] = answers
            f.write(json.dumps(rec) + "\n")
    os.replace(out + ".tmp", out)


def main(argv):
    out, rest = None, []
    for i, a in enumerate(argv):  # --out PATH | --out=PATH; the rest are opd.py's flags
        if a.startswith("--out="):
            out = a[6:]
        elif a == "--out":
            out = argv[i + 1] if i + 1 < len(argv) else ""
        elif not (i and argv[i - 1] == "--out"):
            rest.append(a)
    argv = rest
    if not out:
        sys.exit("teacher_data.py: --out PATH is required (where the dataset goes); other flags are opd.py's")
    import opd

    cfg = opd.parse_config(argv)
    rank = int(os.environ.get("RANK", "0"))
    if not cfg.verbose:  # vLLM's output -> <out dir>/logs/rank<R>.log, as opd.py does
        logs.quiet_console(rank)
        logs.library_log_to(os.path.dirname(os.path.abspath(out)), rank)
    config.apply_toy_defaults(cfg, config.given_keys(argv))
    config.check_config(cfg, world=int(os.environ.get("WORLD_SIZE", "1")))
    if len(cfg.teacher) != 1:
        raise config.ConfigError(f"teacher_data.py needs exactly one teacher, the config has {len(cfg.teacher)} "
                                 f"({', '.join(cfg.teacher) or 'none'})")
    used = [cfg.pretrain, *(t.model_name_or_path for t in cfg.teacher.values())]
    toy.prepare_if_used(used + cfg.data.file_name)
    toy.prepare_if_used(used + cfg.data.file_name, toy_long.TOY_DIR, toy_long.prepare)
    rank, world, _ = opd.init_distributed("cpu")  # gloo for the gather; vLLM picks its own device
    rows, (t_start, t_sample), tokenizer, llm = sample_answers(cfg, rank, world)
    every = [None] * world
    dist.gather_object((rows, t_start, t_sample), every if rank == 0 else None, dst=0)
    if rank == 0:
        rows = [r for part, _, _ in every for r in part]
        write(out, rows, tokenizer)
        n_tok = sum(len(a) for _, _, answers in rows for a in answers)
        cost = {"prompts": len(rows), "answers": sum(len(a) for _, _, a in rows), "response_tokens": n_tok,
                "ranks": world, "engine_start_s": max(p[1] for p in every), "sampling_s": max(p[2] for p in every),
                "teacher": next(iter(cfg.teacher.values())).model_name_or_path, "seed": cfg.seed}
        with open(out + ".json", "w") as f:
            json.dump(cost, f, indent=1)
        logs.banner(f"teacher data: {cost['prompts']} prompts x {cfg.num_return_sequences_in_group} answers, "
                    f"{n_tok:,} tokens sampled in {cost['sampling_s']:.1f} s on {world} rank(s) "
                    f"(+ {cost['engine_start_s']:.1f} s engine start-up) -> {out}")
    dist.barrier()
    # No destroy_process_group here: vLLM's engine shutdown (a finalizer that runs at
    # exit, since vLLM gc.freeze()s what it built) tears down its groups and then the
    # default one; destroying them first makes that shutdown fail (vLLM 0.32.0).
    del llm


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (config.ConfigError, data.DataError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            logs.error(e)
        sys.exit(2)
