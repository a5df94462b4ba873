"""The long-answer toy world (issue 12): worked answers that are right and long enough,
and a quick build with the cached layout."""

import os
import re

import toy
import toy_long


def test_worked_answers_add_up_column_by_column():
    records = toy_long.make_problems(300, seed=3)
    assert len({r["prompt"] for r in records}) == 300
    for r in records:
        a, b = map(int, re.findall(r"\d+", r["prompt"])[:2])
        *columns, boxed = r["solution"].split()
        carry, digits = 0, []
        for col, x, y in zip(columns, str(a).zfill(len(columns))[::-1], str(b).zfill(len(columns))[::-1]):
            assert col == f"{x}+{y}{'+1' if carry else ''}={int(x) + int(y) + carry}", (r["prompt"], col)
            carry, digits = (int(x) + int(y) + carry) // 10, digits + [(int(x) + int(y) + carry) % 10]
        assert toy.parse_boxed(boxed) == r["ground_truth"] == str(a + b)
        assert r["difficulty"] == 1 + sum(int(c.split("=")[1]) >= 10 for c in columns)


def test_answers_are_reasoning_of_30_to_80_tokens_and_the_quick_world_builds(tmp_path):
    paths = toy_long.prepare(str(tmp_path / "world"), quick=True)
    assert {"teacher", "student", "train.jsonl", "val.jsonl", "info.json", "DONE"} <= set(os.listdir(paths["dir"]))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    lengths = [len(toy.encode_answer(tok, r)) for r in toy_long.make_problems(200, seed=4)]
    assert 30 <= sum(lengths) / len(lengths) <= 80 and max(lengths) <= toy_long.MAX_NEW, lengths
