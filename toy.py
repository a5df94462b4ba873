"""The toy world: a tiny task, tokenizer, student and teacher, all built from code.

What this module owns:
  * a synthetic task: two-operand addition / subtraction with operands in 0..99,
    written in the seed data format (one JSON object per line, see `make_problems`);
  * a byte-level BPE tokenizer trained on those texts, with Qwen-style ChatML
    special tokens and chat template;
  * two randomly initialised Qwen3 models: a bigger *teacher* (673k parameters),
    SFT-trained until it solves almost every validation problem greedily, and a smaller
    *student* (376k), SFT-trained only until it first solves a quarter of them: it knows
    the answer format `\\boxed{N}<|im_end|>` and has begun to learn the arithmetic,
    and distillation has the rest to do (it stays at most half as good as the teacher);
  * `prepare()`, which builds all of the above once and caches it on disk in HF
    format, loadable by `transformers` and by vLLM (`quick=True`: a seconds-long
    smoke-test world of the same layout whose models have barely trained).

What it simplifies (on purpose, so that the whole world builds in about two and a half
minutes on two CPU cores and nothing is downloaded):
  * the task has a single exactly-checkable answer and no reasoning text;
  * the models have a few hundred thousand parameters, fp32, trained on CPU with a
    bare AdamW loop (warmup + cosine, no packing, no clipping, one thread);
  * the vocabulary is a few hundred tokens, so both models share one tokenizer;
  * both step counts look at validation accuracy (the teacher trains on while it is
    below `TEACHER["min_acc"]`, the student stops at `STUDENT["start_acc"]`), a mild
    peek at val a real setup would avoid;
  * the head is untied from the embeddings (as when the world was first built, before
    the weight sync handled tied heads; tied ones now sync too, see the weight-sync
    test), and head_dim is >= 32 (vLLM's CPU attention kernel rejects smaller heads).

Run `python toy.py [--force] [--quick]` to build the cache (default: $OPD_TOY_DIR or
.cache/toy-v<VERSION> next to this file; $OPD_TOY_QUICK=1 makes the default build quick).
Deterministic: the same code, seeds and thread count give the same world.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

VERSION = 2  # bump when the world changes, so that an old cache is not reused
TOY_DIR = os.path.abspath(
    os.environ.get("OPD_TOY_DIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", f"toy-v{VERSION}"))

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The cached world. The teacher must be decent, the student poor but well-formatted.
# From tuning on 2 shared cores: a small model learns 2-digit arithmetic in a sudden jump
# whose timing depends on the seed. With init_std 0.02, 4 heads or 2000 problems it came
# late or not at all within 1000 steps; with the values below it came for every seed tried.
N_TRAIN, N_VAL = 5000, 200
TRAIN_SEED, VAL_SEED = 0, 1
TEACHER = dict(arch=dict(hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=32,
                         intermediate_size=256, init_std=0.08, seed=1),
               sft=dict(steps=1000, lr=5e-3, batch_size=32, seed=1),
               # if the arithmetic has not "clicked" yet (val acc < min_acc), train on, at most twice
               min_acc=0.5, more=dict(steps=300, lr=2e-3, batch_size=32), max_more=2)
# The student: smaller (56% of the teacher's parameters), SFT-trained in chunks only until
# its greedy val accuracy first reaches `start_acc`: it knows the format and has begun to
# learn the arithmetic; the rest is left for distillation. A chunk that overshoots
# `max_share` of the teacher's accuracy is undone.
STUDENT = dict(arch=dict(hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=32,
                         intermediate_size=192, init_std=0.08, seed=2),
               chunk=dict(steps=50, lr=5e-3, batch_size=32), max_chunks=60, start_acc=0.25, max_share=0.5)


def log(msg: str) -> None:
    # under opd.py's quiet console (logs.quiet_console) sys.stderr is the library log: a
    # first-time build's progress belongs on the terminal
    console = getattr(sys.modules.get("logs"), "console_err", None)
    print(f"[toy] {msg}", file=console or sys.stderr, flush=True)


@contextlib.contextmanager
def torch_threads(n: int):
    """Temporarily use `n` intra-op threads. The toy matrices are so small that one
    thread is about as fast as many, and it does not collapse when cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- task


N_ADD, N_SUB = 100 * 100, 100 * 101 // 2  # distinct a + b, and a - b with a >= b


def _problem(a: int, b: int, op: str) -> tuple[str, int]:
    value = a + b if op == "add" else a - b
    return f"Compute {a} {'+' if op == 'add' else '-'} {b}. Put the answer in \\boxed{{}}.", value


def _difficulty(a: int, b: int, op: str) -> int:
    """1 + number of carries (add) or borrows (sub) in the column algorithm."""
    if op == "add":
        return 1 + (a % 10 + b % 10 >= 10) + (a + b >= 100)
    return 1 + (a % 10 < b % 10)


def make_problems(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct problems, deterministic in `seed`; tags alternate add/sub.

    Subtraction keeps a >= b so every answer is a non-negative integer. Prompts in
    `exclude` are skipped (used to keep validation disjoint from train).
    """
    excluded_sub = sum(" - " in p for p in exclude)
    if (n + 1) // 2 > N_ADD - (len(exclude) - excluded_sub) or n // 2 > N_SUB - excluded_sub:
        raise ValueError(f"not enough distinct problems for n={n} with {len(exclude)} excluded")
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        op = ("add", "sub")[len(out) % 2]
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "sub" and a < b:
            a, b = b, a
        prompt, value = _problem(a, b, op)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({
            "id": f"toy-{seed}-{len(out)}",
            "source": "toy",
            "difficulty": _difficulty(a, b, op),
            "prompt": prompt,
            "messages": [{"role": "user", "content": prompt}],
            "tag": op,
            "ground_truth": str(value),
            "test_cases": "",
        })
    return out


def answer_text(record: dict) -> str:
    """The target completion, without the eos token (a record's worked `solution`, if any)."""
    return record.get("solution") or f"\\boxed{{{record['ground_truth']}}}"


def parse_boxed(text: str) -> str | None:
    m = re.search(r"\\boxed\{\s*(-?\d+)\s*\}", text)
    return m.group(1) if m else None


def write_jsonl(records, path: str) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts: list[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE (digits split one by one) with ChatML specials and template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512)
    hf.add_special_tokens({"additional_special_tokens": [IM_START]})  # so decoding can skip it
    hf.eos_token, hf.pad_token = IM_END, PAD  # no bos: nothing is prepended, as in Qwen
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tokenizer_texts(records: list[dict]) -> list[str]:
    roles = ["user\n", "assistant\n", "system\n"]
    return [r["prompt"] for r in records] + [answer_text(r) for r in records] + roles


def encode_prompt(tokenizer, record: dict) -> list[int]:
    text = tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_answer(tokenizer, record: dict) -> list[int]:
    return tokenizer.encode(answer_text(record), add_special_tokens=False) + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------- models


def build_model(tokenizer, *, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                intermediate_size=128, seed=0, init_std=0.02, tie_word_embeddings=False) -> Qwen3ForCausalLM:
    """A freshly initialised fp32 Qwen3 (untied head unless asked); deterministic in `seed`."""
    if head_dim < 32:
        raise ValueError(f"head_dim must be >= 32 (vLLM CPU attention), got {head_dim}")
    config = Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.pad_token_id,  # as in Qwen: bos id = <|endoftext|>, never prepended
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


def save_pretrained(model, tokenizer, path: str) -> None:
    """HF layout: config.json, model.safetensors, generation_config.json, tokenizer files."""
    os.makedirs(path, exist_ok=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- training


def _sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids / attention_mask / labels (labels = -100 outside the answer)."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p):n] = torch.tensor(a)
        mask[i, :n] = 1
    return ids, mask, labels


def sft_loss(model, tokenizer, records: list[dict]) -> float:
    """Mean answer-token cross-entropy over `records` (no grad)."""
    examples = [(encode_prompt(tokenizer, r), encode_answer(tokenizer, r)) for r in records]
    ids, mask, labels = _sft_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sft(model, tokenizer, records: list[dict], *, steps: int, lr: float = 3e-3, batch_size: int = 64,
        seed: int = 0, log_every: int = 0):
    """Plain SFT on chat prompt + `\\boxed{answer}<|im_end|>`, loss on answer tokens only.

    Batches are sampled with replacement across steps (without, within a step). Trains
    `model` in place and returns it, in eval mode."""
    examples = [(encode_prompt(tokenizer, r), encode_answer(tokenizer, r)) for r in records]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, steps))
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        ids, mask, labels = _sft_batch(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            log(f"  sft step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()
    return model


@torch.no_grad()
def greedy_completions(model, tokenizer, records: list[dict], max_new_tokens: int = 12) -> list[str]:
    """Greedy completions (special tokens dropped) for the records' chat prompts, in one batch."""
    model.eval()
    prompts = [encode_prompt(tokenizer, r) for r in records]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, so every row continues at the same position
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def greedy_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int = 12) -> float:
    """Share of records whose greedy completion has `\\boxed{N}` with N == ground_truth."""
    return _accuracy(greedy_completions(model, tokenizer, records, max_new_tokens), records)


def _well_formed(text: str) -> bool:
    return re.fullmatch(r"\\boxed\{-?\d+\}", text.strip()) is not None


def _accuracy(texts: list[str], records: list[dict]) -> float:
    return sum(parse_boxed(t) == r["ground_truth"] for t, r in zip(texts, records)) / len(records)


# ----------------------------------------------------------------------------- the cached world


def _paths(dir: str) -> dict[str, str]:
    dir = os.path.abspath(dir)
    names = {"train": "train.jsonl", "val": "val.jsonl", "student": "student", "teacher": "teacher"}
    return {"dir": dir, **{k: os.path.join(dir, v) for k, v in names.items()}}


def _info(model, tokenizer, val, steps, t0, spec):
    texts = greedy_completions(model, tokenizer, val)
    return {"val_greedy_acc": _accuracy(texts, val), "val_well_formed": sum(_well_formed(x) for x in texts) / len(val),
            "sft_steps": steps, "params": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.time() - t0, 1), "spec": spec}


def _train_teacher(spec, tokenizer, train, val):
    """Build and SFT the teacher; returns (model, info for info.json)."""
    t0 = time.time()
    model = build_model(tokenizer, **spec["arch"])
    sft(model, tokenizer, train, **spec["sft"], log_every=spec["sft"]["steps"] // 4)
    steps = spec["sft"]["steps"]
    for i in range(spec["max_more"]):
        acc = greedy_accuracy(model, tokenizer, val)
        if acc >= spec["min_acc"]:
            break
        log(f"teacher: val greedy acc {acc:.3f} < {spec['min_acc']}, training on")
        sft(model, tokenizer, train, **spec["more"], seed=100 + i)
        steps += spec["more"]["steps"]
    return model, _info(model, tokenizer, val, steps, t0, spec)


def _train_student(spec, tokenizer, train, val, teacher_acc):
    """Build the student and SFT it chunk by chunk until it starts to solve problems."""
    t0 = time.time()
    model = build_model(tokenizer, **spec["arch"])
    chunks = 0
    while chunks < spec["max_chunks"]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sft(model, tokenizer, train, **spec["chunk"], seed=chunks)
        chunks += 1
        acc = greedy_accuracy(model, tokenizer, val)
        if acc > spec["max_share"] * teacher_acc:  # overshot: back to the chunk before
            model.load_state_dict(before)
            chunks -= 1
            break
        if acc >= spec["start_acc"]:
            break
    return model, _info(model, tokenizer, val, chunks * spec["chunk"]["steps"], t0, spec)


def _specs(quick: bool):
    """(n_train, n_val, teacher spec, student spec); `quick` is a seconds-long smoke-test
    world with the same layout whose models have barely trained."""
    if not quick:
        return N_TRAIN, N_VAL, TEACHER, STUDENT
    return (300, 40, {**TEACHER, "sft": {**TEACHER["sft"], "steps": 60}, "max_more": 0},
            {**STUDENT, "chunk": {**STUDENT["chunk"], "steps": 10}, "max_chunks": 1})


def _build(tmp: str, quick: bool = False) -> None:
    t0 = time.time()
    n_train, n_val, teacher_spec, student_spec = _specs(quick)
    train = make_problems(n_train, TRAIN_SEED)
    val = make_problems(n_val, VAL_SEED, exclude={r["prompt"] for r in train})
    write_jsonl(train, os.path.join(tmp, "train.jsonl"))
    write_jsonl(val, os.path.join(tmp, "val.jsonl"))
    tokenizer = build_tokenizer(tokenizer_texts(train))
    log(f"{len(train)} train / {len(val)} val problems, tokenizer (vocab {len(tokenizer)}) "
        f"in {time.time() - t0:.1f}s")
    info = {"n_train": len(train), "n_val": len(val), "vocab": len(tokenizer), "quick": quick}
    for name in ("teacher", "student"):
        model, info[name] = (_train_teacher(teacher_spec, tokenizer, train, val) if name == "teacher" else
                             _train_student(student_spec, tokenizer, train, val, info["teacher"]["val_greedy_acc"]))
        i = info[name]
        log(f"{name}: {i['params'] / 1e3:.0f}k params, {i['sft_steps']} SFT steps, val greedy acc "
            f"{i['val_greedy_acc']:.3f}, well-formed {i['val_well_formed']:.3f}, {i['seconds']}s")
        save_pretrained(model, tokenizer, os.path.join(tmp, name))
    info["build_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f, indent=2)


def prepare(dir: str = TOY_DIR, force: bool = False, quick: bool = False) -> dict[str, str]:
    """Build the toy world into `dir` once; later calls return the cached paths.
    `quick`: the smoke-test world (seconds, untrained models; for tests of the plumbing,
    not of learning)."""
    paths = _paths(dir)
    build_cached(paths["dir"], _build, "toy world", force, quick)
    return paths


def build_cached(dir: str, build, what: str, force: bool = False, quick: bool = False) -> None:
    """Run `build(tmp, quick)` once for `dir` (shared by both toy worlds).

    The build goes to a sibling temp dir whose entries are then moved into `dir`;
    the `DONE` marker is moved last, so an interrupted build is redone next time.
    Other files already in `dir` are left alone. $OPD_TOY_QUICK=1 makes every build quick."""
    quick = quick or os.environ.get("OPD_TOY_QUICK") == "1"
    done = os.path.join(dir, "DONE")
    if os.path.exists(done) and not force:
        return
    t0 = time.time()
    log(f"building {what} in {dir}")
    os.makedirs(dir, exist_ok=True)
    tmp = f"{dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with torch_threads(1):
            build(tmp, quick)
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        if os.path.exists(done):
            os.remove(done)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "DONE"):  # DONE last
            dst = os.path.join(dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, name), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.time() - t0:.1f}s")


def prepare_if_used(paths: list[str], root: str = TOY_DIR, prepare=prepare) -> None:
    """Run `prepare()` if any of `paths` lies in the world at `root` and it is not completely
    built yet. Under torchrun local rank 0 builds; the other local ranks wait for its DONE."""
    done = os.path.join(root, "DONE")
    if any(os.path.abspath(p).startswith(root) for p in paths) and not os.path.exists(done):
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            prepare()
        while not os.path.exists(done):
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=TOY_DIR)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke-test world (untrained models)")
    args = parser.parse_args()
    paths = prepare(args.dir, force=args.force, quick=args.quick)
    for k, v in paths.items():
        print(f"{k}: {v}")
    with open(os.path.join(paths["dir"], "info.json")) as f:
        info = json.load(f)
    for name in ("teacher", "student"):
        print(f"{name} val greedy acc: {info[name]['val_greedy_acc']:.3f}")


if __name__ == "__main__":
    main()
