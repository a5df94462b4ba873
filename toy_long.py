"""The long-answer toy world: multi-digit addition worked out column by column.

Issue 12's teaching task needs answers with room for exposure bias: here every answer is
reasoning of roughly 30-50 tokens before the result, e.g. for 4821 + 397

    1+7=8 2+9=11 8+3+1=12 4+0+1=5 \\boxed{5218}

(columns from the right, each with the carry from the one before; the math reward checks
the \\boxed{} result against ground_truth). One early slip changes every later column, so
a student that only imitates the teacher's answers meets states it never saw in training.

Built like toy.py's world and with its pieces (tokenizer, models, SFT, the cache): a
teacher trained by SFT until it adds >= `TEACHER["min_acc"]` of the validation problems
right greedily, and a smaller student trained in chunks only until it first reaches
`STUDENT["start_acc"]` (never more than half the teacher). Cached in .cache/toy-long-v1.

    python toy_long.py [--force] [--quick]
"""

import argparse
import json
import os
import random
import time

import toy

VERSION = 1
TOY_DIR = os.path.abspath(os.environ.get("OPD_TOY_LONG_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), ".cache", f"toy-long-v{VERSION}"))
MAX_NEW = 64  # answer tokens a greedy check allows (the longest answers are ~50)
N_TRAIN, N_VAL = 8000, 200
TEACHER = dict(arch=dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                         intermediate_size=256, init_std=0.08, seed=1),
               chunk=dict(steps=300, lr=3e-3, batch_size=32), max_chunks=8, min_acc=0.9)
STUDENT = dict(arch=dict(hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=32,
                         intermediate_size=192, init_std=0.08, seed=2),
               chunk=dict(steps=25, lr=3e-3, batch_size=32), max_chunks=40, start_acc=0.2, max_share=0.5)


def solution(a: int, b: int) -> str:
    """The worked answer: each column from the right as `x+y(+1)=s`, then the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return " ".join(steps) + f" \\boxed{{{a + b}}}"


def make_problems(n: int, seed: int, exclude=frozenset()) -> list[dict]:
    """`n` distinct problems a + b with 3- and 4-digit operands, in the seed data format."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        prompt = f"Add {a} and {b}. Put the answer in \\boxed{{}}."
        if prompt in seen:
            continue
        seen.add(prompt)
        carries = sum(1 for s in solution(a, b).split()[:-1] if int(s.split("=")[1]) >= 10)
        out.append({"id": f"long-{seed}-{len(out)}", "source": "toy-long", "difficulty": 1 + carries,
                    "prompt": prompt, "messages": [{"role": "user", "content": prompt}], "tag": "longadd",
                    "ground_truth": str(a + b), "solution": solution(a, b), "test_cases": ""})
    return out


def _accuracy(model, tokenizer, val):
    return toy.greedy_accuracy(model, tokenizer, val, max_new_tokens=MAX_NEW)


def _train(spec, tokenizer, train, val, stop, name):
    """SFT in chunks until `stop(acc)`; returns (model, info). A chunk after which `stop`
    says "overshot" (-1) is undone."""
    t0, model, chunks, acc = time.time(), toy.build_model(tokenizer, **spec["arch"]), 0, 0.0
    while chunks < spec["max_chunks"]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        toy.sft(model, tokenizer, train, **spec["chunk"], seed=chunks)
        chunks += 1
        new = _accuracy(model, tokenizer, val)
        toy.log(f"{name}: chunk {chunks}, val greedy acc {new:.3f}")
        verdict = stop(new)
        if verdict < 0:
            model.load_state_dict(before)
            chunks -= 1
            break
        acc = new
        if verdict > 0:
            break
    info = {"val_greedy_acc": acc, "sft_steps": chunks * spec["chunk"]["steps"],
            "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 1)}
    return model, info


def _build(tmp: str, quick: bool = False) -> None:
    t0 = time.time()
    n_train, n_val = (300, 40) if quick else (N_TRAIN, N_VAL)
    teacher_spec, student_spec = TEACHER, STUDENT
    if quick:  # the smoke-test world: same layout, barely trained
        teacher_spec = {**TEACHER, "chunk": {**TEACHER["chunk"], "steps": 20}, "max_chunks": 1}
        student_spec = {**STUDENT, "chunk": {**STUDENT["chunk"], "steps": 10}, "max_chunks": 1}
    train = make_problems(n_train, seed=0)
    val = make_problems(n_val, seed=1, exclude={r["prompt"] for r in train})
    toy.write_jsonl(train, os.path.join(tmp, "train.jsonl"))
    toy.write_jsonl(val, os.path.join(tmp, "val.jsonl"))
    tokenizer = toy.build_tokenizer(toy.tokenizer_texts(train))
    info = {"n_train": len(train), "n_val": len(val), "vocab": len(tokenizer), "quick": quick}
    teacher, info["teacher"] = _train(teacher_spec, tokenizer, train, val,
                                      lambda acc: acc >= teacher_spec["min_acc"], "teacher")
    cap = student_spec["max_share"] * info["teacher"]["val_greedy_acc"]
    student, info["student"] = _train(student_spec, tokenizer, train, val,
                                      lambda acc: -1 if acc > cap else acc >= student_spec["start_acc"], "student")
    for name, model in (("teacher", teacher), ("student", student)):
        toy.save_pretrained(model, tokenizer, os.path.join(tmp, name))
        i = info[name]
        toy.log(f"{name}: {i['params'] / 1e3:.0f}k params, {i['sft_steps']} SFT steps, "
                f"val greedy acc {i['val_greedy_acc']:.3f}, {i['seconds']}s")
    info["build_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f, indent=2)


def prepare(dir: str = TOY_DIR, force: bool = False, quick: bool = False) -> dict[str, str]:
    """Build the long-answer world into `dir` once; later calls return the cached paths."""
    toy.build_cached(os.path.abspath(dir), _build, "long-answer toy world", force, quick)
    names = {"train": "train.jsonl", "val": "val.jsonl", "student": "student", "teacher": "teacher"}
    return {"dir": os.path.abspath(dir), **{k: os.path.join(os.path.abspath(dir), v) for k, v in names.items()}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=TOY_DIR)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(prepare(args.dir, args.force, args.quick))
