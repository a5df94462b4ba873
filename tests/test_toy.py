"""Fast checks of the toy world (no full prepare(): that one takes about a minute)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data
import toy  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with toy.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def problems():
    return toy.make_problems(60, seed=0)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return toy.build_tokenizer(toy.tokenizer_texts(problems))


def test_problems_deterministic_and_well_formed(problems):
    assert toy.make_problems(60, seed=0) == problems
    assert toy.make_problems(60, seed=1) != problems
    assert len({r["prompt"] for r in problems}) == len(problems)
    assert {r["tag"] for r in problems} == {"add", "sub"}
    for r in problems:
        assert set(r) == {"id", "source", "difficulty", "prompt", "messages", "tag", "ground_truth", "test_cases"}
        assert r["source"] == "toy" and r["test_cases"] == "" and isinstance(r["difficulty"], int)
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}]
        assert r["prompt"].endswith("Put the answer in \\boxed{}.")
        a, op, b = r["prompt"].split(".")[0].split()[1:4]
        assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        assert int(r["ground_truth"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert r["tag"] == ("add" if op == "+" else "sub")


def test_splits_disjoint(problems, tmp_path):
    val = toy.make_problems(200, seed=1, exclude={r["prompt"] for r in problems})
    assert len(val) == 200 and not {r["prompt"] for r in val} & {r["prompt"] for r in problems}
    path = tmp_path / "val.jsonl"
    toy.write_jsonl(val, str(path))
    back = data.read_jsonl([str(path)])  # what opd.py reads back, each record with its file:line
    assert [r.pop("_where") for r in back] == [f"{path}:{i}" for i in range(1, 201)]
    assert back == val
    with pytest.raises(ValueError):  # tags alternate, and there are only 5050 distinct a - b
        toy.make_problems(10102, seed=0)


def test_parse_boxed():
    assert toy.parse_boxed("\\boxed{68}") == "68"
    assert toy.parse_boxed("so \\boxed{-7}<|im_end|>") == "-7"
    assert toy.parse_boxed("\\boxed{}") is None and toy.parse_boxed("68") is None


def test_tokenizer_round_trips_and_splits_digits(tokenizer, problems):
    r = problems[0]
    for text in [r["prompt"], toy.answer_text(r), "unseen text: héllo ∑ 12345\n"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer.encode("1234", add_special_tokens=False))
    assert digits == ["1", "2", "3", "4"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [im_start]
    answer = toy.encode_answer(tokenizer, r)
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer) == toy.answer_text(r) + "<|im_end|>"


def test_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "Compute 1 + 2."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n"
    msgs.append({"role": "assistant", "content": "\\boxed{3}"})
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n\\boxed{3}<|im_end|>\n")


def test_build_model_shape(tokenizer):
    model = toy.build_model(tokenizer, seed=0)
    cfg = model.config
    assert cfg.head_dim >= 32 and not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tokenizer)
    assert cfg.eos_token_id == tokenizer.eos_token_id and cfg.pad_token_id == tokenizer.pad_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())
    same = toy.build_model(tokenizer, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    with pytest.raises(ValueError):
        toy.build_model(tokenizer, head_dim=16)


def test_save_pretrained_round_trip(tokenizer, problems, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = toy.build_model(tokenizer, seed=3).eval()
    toy.save_pretrained(model, tokenizer, str(tmp_path))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["tie_word_embeddings"] is False

    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    model2 = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(model2).__name__ == "Qwen3ForCausalLM" and model2.dtype == torch.float32
    assert toy.encode_prompt(tok2, problems[0]) == toy.encode_prompt(tokenizer, problems[0])
    assert (tok2.eos_token_id, tok2.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = torch.tensor([toy.encode_prompt(tokenizer, problems[0]) + toy.encode_answer(tokenizer, problems[0])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model2(ids).logits, rtol=0, atol=1e-6)


def test_sft_reduces_loss(tokenizer, problems):
    model = toy.build_model(tokenizer, seed=0)
    records = problems[:8]
    before = toy.sft_loss(model, tokenizer, records)
    toy.sft(model, tokenizer, records, steps=30, batch_size=8)
    after = toy.sft_loss(model, tokenizer, records)
    assert after < 0.5 * before, (before, after)
    assert 0.0 <= toy.greedy_accuracy(model, tokenizer, records) <= 1.0


def test_prepare_returns_cache_without_rebuilding(tmp_path):
    (tmp_path / "DONE").write_text("x")
    paths = toy.prepare(str(tmp_path))
    assert paths == {k: str(tmp_path / v) if v else str(tmp_path) for k, v in
                     {"dir": "", "train": "train.jsonl", "val": "val.jsonl",
                      "student": "student", "teacher": "teacher"}.items()}
    assert os.listdir(tmp_path) == ["DONE"]  # nothing was built


def test_prepare_force_replaces_build_and_marks_done_last(tmp_path, monkeypatch):
    calls = []

    def fake_build(tmp, quick):
        calls.append((tmp, quick))
        for name in ("train.jsonl", "val.jsonl", "info.json"):
            (open(os.path.join(tmp, name), "w")).write(str(len(calls)))
        for name in ("teacher", "student"):
            os.makedirs(os.path.join(tmp, name))

    monkeypatch.setattr(toy, "_build", fake_build)
    (tmp_path / "mine.txt").write_text("keep me")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "stale.bin").write_text("old")
    paths = toy.prepare(str(tmp_path))
    assert (tmp_path / "DONE").exists() and (tmp_path / "train.jsonl").read_text() == "1"
    assert not (tmp_path / "teacher" / "stale.bin").exists() and (tmp_path / "mine.txt").exists()
    assert toy.prepare(str(tmp_path)) == paths and len(calls) == 1  # cached
    toy.prepare(str(tmp_path), force=True, quick=True)
    assert len(calls) == 2 and (tmp_path / "train.jsonl").read_text() == "2"
    assert [quick for _, quick in calls] == [False, True]
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(tmp_path.name + ".tmp-")]


@pytest.mark.parametrize("accs, chunks", [
    ([0.05, 0.1, 0.3, 0.4], 3),    # stops at the first chunk that reaches start_acc
    ([0.05, 0.1, 0.7], 2),         # overshoots half the teacher: that chunk is undone
])
def test_student_stops_once_it_starts_to_solve_and_never_past_half_the_teacher(tokenizer, monkeypatch,
                                                                                accs, chunks):
    script = iter(accs)
    monkeypatch.setattr(toy, "sft", lambda model, *a, **k: model.lm_head.weight.data.add_(1.0))
    monkeypatch.setattr(toy, "greedy_accuracy", lambda *a, **k: next(script))
    monkeypatch.setattr(toy, "greedy_completions", lambda model, tok, val, *a: ["\\boxed{0}"] * len(val))
    spec = {**toy.STUDENT, "start_acc": 0.25, "max_share": 0.5, "max_chunks": 10}
    w0 = toy.build_model(tokenizer, **spec["arch"]).lm_head.weight.clone()
    model, info = toy._train_student(spec, tokenizer, [], [{"ground_truth": "0"}], teacher_acc=1.0)
    assert info["sft_steps"] == chunks * spec["chunk"]["steps"]
    assert torch.allclose(model.lm_head.weight, w0 + chunks)  # the undone chunk left no trace
