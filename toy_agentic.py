"""The agentic toy world: two text games, a tokenizer, a teacher and a student, built from code.

What this module owns:
  * the games (`ENVS`, the same as configs/agentic_toy.yaml's `custom_envs`): guess a
    number from 1 to 20 with higher/lower feedback (tag `guess`), and Nim from 5..15
    stones against a random opponent (tag `nim`); both from envs.py;
  * a byte-level BPE tokenizer trained on the games' texts (toy.build_tokenizer: ChatML);
  * a Qwen3 *teacher* trained by SFT on expert episodes until it wins at least
    `TEACHER["min_success"]` of the validation episodes greedily, and a smaller *student*
    trained the same way only until it first wins `STUDENT["start_success"]` of them
    (never more than half the teacher's rate): it knows the format, distillation has
    the rest to do;
  * `prepare()`: builds all of that once and caches it in HF format (quick=True: a
    seconds-long smoke-test world of the same layout).

The SFT rows are the very rows agentic training uses (agent.py: the first observation
rendered, actions appended as token ids, observations wrapped by the chat template), so
teacher and student learn exactly the token layout they will be scored on. In a share of
the turns the row plays a random move instead of the expert's, with no loss on it: the
models then also see (and learn the expert's answer in) states off the expert's path,
which is where an on-policy student goes.

Simplified: like toy.py (one thread, fp32, a bare AdamW loop, the step count looks at
validation success); the teacher is trained, not distilled from anything bigger.

Run `python toy_agentic.py [--force] [--quick]` to build the cache (default:
$OPD_AGENTIC_TOY_DIR or .cache/agentic-toy-v<VERSION> next to this file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from types import SimpleNamespace

import torch

import agent
import toy

VERSION = 1
TOY_DIR = os.path.abspath(
    os.environ.get("OPD_AGENTIC_TOY_DIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", f"agentic-toy-v{VERSION}"))

# tag -> env spec; configs/agentic_toy.yaml's custom_envs must say the same (a test checks)
ENVS = {
    "guess": dict(env_type="guess_number", env_config={"low": 1, "high": 20}, max_turns=6, max_tokens_per_turn=6),
    "nim": dict(env_type="nim", env_config={"min_stones": 5, "max_stones": 15, "max_take": 3}, max_turns=5,
                max_tokens_per_turn=6),
}
MAX_LEN = 256          # prompt_length + response_length of the config
N_TRAIN, N_VAL = 2000, 64   # episodes per tag; validation = agent.val_seeds (as opd.py plays them)
NOISE = 0.3            # share of turns that play a random (untrained) move
TEACHER = dict(arch=dict(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                         intermediate_size=256, init_std=0.08, seed=1),
               chunk=dict(steps=100, lr=3e-3, batch_size=32), max_chunks=12, min_success=0.95)
STUDENT = dict(arch=dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                         intermediate_size=256, init_std=0.08, seed=2),
               chunk=dict(steps=10, lr=3e-3, batch_size=32), max_chunks=60, start_success=0.4, max_share=0.5)


def specs():
    return {tag: SimpleNamespace(**s) for tag, s in ENVS.items()}


# ----------------------------------------------------------------------------- episodes


def _random_move(env):
    if hasattr(env, "lo"):
        return str(random.randint(env.lo, env.hi))
    return str(random.randint(1, min(env.max_take, env.stones)))


def expert_rows(tokenizer, pairs, noise, seed):
    """Rows (ids, loss mask) of episodes played by the expert, a `noise` share of the turns
    replaced by a random move that is not trained on."""
    random.seed(seed)
    sp = specs()
    eps = [agent.start(sp[tag], tag, s, i, tokenizer, "native", MAX_LEN) for i, (tag, s) in enumerate(pairs)]
    noisy = {id(e): [] for e in eps}

    def act(rows, budgets):
        out = []
        for e, budget in zip([e for e in eps if not e.end], budgets):
            rnd = random.random() < noise
            noisy[id(e)].append(rnd)
            text = _random_move(e.env) if rnd else e.env.expert()
            ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            out.append((ids[:budget], [0.0] * len(ids[:budget])))
        return out

    agent.play(act, eps, tokenizer, MAX_LEN)
    rows = []
    for e in eps:
        mask, turn, prev = list(e.mask), -1, 0
        for j, m in enumerate(e.mask):  # action spans in order: zero the random ones
            turn += m and not prev
            prev = m
            if m and noisy[id(e)][turn]:
                mask[j] = 0
        rows.append((e.prompt + e.ids, [0] * len(e.prompt) + mask))
    return rows


def _batch(rows, pad_id):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        labels[i, :len(r)] = torch.where(torch.tensor(m) == 1, torch.tensor(r), -100)
    return ids, attn, labels


def sft(model, rows, pad_id, *, steps, lr, batch_size, seed):
    """AdamW on the masked next-token loss of random batches of rows (constant lr)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, attn, labels = _batch(rng.sample(rows, batch_size), pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def hf_actor(model, tokenizer):
    """Greedy actions from a transformers model (left-padded batch, cut at eos)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    @torch.no_grad()
    def act(rows, budgets):
        if not rows:
            return []
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max(budgets), do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
        cut = [(o[:o.index(eos) + 1] if eos in o else o)[:b] for o, b in zip(out, budgets)]
        return [(c, [0.0] * len(c)) for c in cut]
    return act


def success(model, tokenizer, pairs):
    """Share of the (tag, seed) episodes that `model` wins playing greedily."""
    sp = specs()
    eps = [agent.start(sp[tag], tag, s, i, tokenizer, "native", MAX_LEN) for i, (tag, s) in enumerate(pairs)]
    agent.play(hf_actor(model, tokenizer), eps, tokenizer, MAX_LEN)
    return sum(e.success for e in eps) / len(eps)


# ----------------------------------------------------------------------------- the cached world


def _train(spec, rows, tokenizer, val, *, stop, undo_above=None):
    """SFT chunk by chunk until `stop(success)`; a chunk that passes `undo_above` is undone."""
    t0 = time.time()
    model = toy.build_model(tokenizer, **spec["arch"])
    chunks, acc = 0, 0.0
    while chunks < spec["max_chunks"]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss = sft(model, rows, tokenizer.pad_token_id, **spec["chunk"], seed=chunks)
        new = success(model, tokenizer, val)
        toy.log(f"  chunk {chunks + 1}: loss {loss:.3f}, val success {new:.3f}")
        if undo_above is not None and new > undo_above:
            model.load_state_dict(before)
            break
        chunks, acc = chunks + 1, new
        if stop(acc):
            break
    return model, {"val_success": acc, "sft_steps": chunks * spec["chunk"]["steps"],
                   "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 1)}


def _build(tmp, quick=False):
    t0 = time.time()
    n_train, n_val = (64, 16) if quick else (N_TRAIN, N_VAL)
    train_pairs = [(tag, 1000 + i) for tag in ENVS for i in range(n_train)]
    val = agent.val_seeds(sorted(ENVS), n_val)
    texts_tok = toy.build_tokenizer(["x"], vocab_size=300)  # a byte-level stand-in to play the expert
    texts = []
    for ids, _ in expert_rows(texts_tok, train_pairs[::4], NOISE, seed=0):
        texts.append(texts_tok.decode(ids, skip_special_tokens=True))
    tokenizer = toy.build_tokenizer(texts + ["user\n", "assistant\n"], vocab_size=384)
    rows = expert_rows(tokenizer, train_pairs, NOISE, seed=1)
    toy.log(f"{len(rows)} expert episodes, tokenizer (vocab {len(tokenizer)}), longest row "
            f"{max(len(r) for r, _ in rows)} tokens, in {time.time() - t0:.1f}s")
    teacher_spec, student_spec = TEACHER, STUDENT
    if quick:
        teacher_spec = {**TEACHER, "chunk": {**TEACHER["chunk"], "steps": 10}, "max_chunks": 1}
        student_spec = {**STUDENT, "chunk": {**STUDENT["chunk"], "steps": 5}, "max_chunks": 1}
    info = {"n_train_episodes": len(rows), "n_val_per_tag": n_val, "vocab": len(tokenizer), "quick": quick,
            "envs": ENVS}
    teacher, info["teacher"] = _train(teacher_spec, rows, tokenizer, val, stop=lambda a: a >= TEACHER["min_success"])
    toy.log(f"teacher: {info['teacher']}")
    toy.save_pretrained(teacher, tokenizer, os.path.join(tmp, "teacher"))
    cap = STUDENT["max_share"] * info["teacher"]["val_success"]
    student, info["student"] = _train(student_spec, rows, tokenizer, val, undo_above=cap,
                                      stop=lambda a: a >= STUDENT["start_success"])
    toy.log(f"student: {info['student']}")
    toy.save_pretrained(student, tokenizer, os.path.join(tmp, "student"))
    info["build_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f, indent=2)


def prepare(dir=TOY_DIR, force=False, quick=False):
    """Build the world into `dir` once (toy.build_cached: temp dir, DONE marker last)."""
    dir = os.path.abspath(dir)
    toy.build_cached(dir, _build, "the agentic toy world", force, quick)
    return dir


def prepare_if_used(paths):
    """Build the world if any of `paths` lies in it (under torchrun: local rank 0 builds)."""
    toy.prepare_if_used(paths, TOY_DIR, prepare)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=TOY_DIR)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    d = prepare(a.dir, force=a.force, quick=a.quick)
    with open(os.path.join(d, "info.json")) as f:
        info = json.load(f)
    print(f"{d}\nteacher val success {info['teacher']['val_success']:.3f}, "
          f"student {info['student']['val_success']:.3f}", file=sys.stdout)
