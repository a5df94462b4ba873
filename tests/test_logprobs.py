"""Chunked response log-probs (rollout.response_logp): the same numbers and gradients as
the plain [B, R, V] computation at every chunk size, chunks that respect the budget, the
output head put back, the unchunked path for models that post-process their logits, and
the same step under FSDP2 on 2 ranks."""

import json
import math

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import rollout
from conftest import TORCHRUN, run_cmd

V = 97  # a vocabulary size that divides nothing
TEMPERATURE = 0.7


def qwen3(vocab=V, tie=False, seed=0, dtype=torch.float64):
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).to(dtype)


def batch(vocab=V):
    """3 rows: left-padded prompts of different lengths, right-padded responses (R = 7)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (3, 5, 2)]
    resps = [torch.randint(3, vocab, (n,), generator=g) for n in (4, 7, 1)]
    return rollout.collate(prompts, resps, [torch.zeros(len(r)) for r in resps],
                           torch.arange(3), ["t"] * 3, pad_id=0)


def value_and_grads(model, b, chunked=True):
    """logp [B, R] and the gradients of a token-weighted sum of it (every position counts)."""
    model.zero_grad(set_to_none=True)
    logp = rollout.response_logp(model, b, TEMPERATURE, chunked=chunked)
    weights = torch.arange(1, logp.shape[1] + 1, dtype=logp.dtype)
    (logp * b.response_mask * weights).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def count_chunks(monkeypatch):
    """Records the number of logit rows of every chunk the head computes."""
    rows = []
    plain = rollout._head_scores

    def spy(head, hidden, sl, score):
        rows.append(hidden.shape[0] * hidden.shape[1])
        return plain(head, hidden, sl, score)

    monkeypatch.setattr(rollout, "_head_scores", spy)
    return rows


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("positions", [1, 2, 3, 6, 7, 100])
def test_chunked_equals_unchunked_values_and_grads(monkeypatch, count_chunks, positions, tie):
    model, b = qwen3(tie=tie), batch()
    ref_logp, ref_grads = value_and_grads(model, b, chunked=False)
    monkeypatch.setattr(rollout, "LOGP_CHUNK_ELEMENTS", positions * len(b) * V)
    count_chunks.clear()
    logp, grads = value_and_grads(model, b)
    R = b.response_mask.shape[1]
    n = math.ceil(R / positions)
    # forward: n chunks of at most the budget; under grad each of several is recomputed once
    assert len(count_chunks) == (n if n == 1 else 2 * n), count_chunks
    assert max(count_chunks) * V <= rollout.LOGP_CHUNK_ELEMENTS
    assert torch.allclose(logp, ref_logp, rtol=0, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(grads[name], g, rtol=1e-10, atol=1e-12), name


def test_no_grad_scores_chunk_without_recompute_in_fp32(monkeypatch, count_chunks):
    """The teachers' call: no_grad, temperature 1, fp32; chunked = unchunked, no graph."""
    model, b = qwen3(dtype=torch.float32), batch()
    with torch.no_grad():
        ref = rollout.response_logp(model, b, chunked=False)
        monkeypatch.setattr(rollout, "LOGP_CHUNK_ELEMENTS", 2 * len(b) * V)
        got = rollout.response_logp(model, b)
    assert len(count_chunks) == 4 and not got.requires_grad
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


def test_matches_log_softmax_of_the_full_logits(monkeypatch):
    """Independent reference: log_softmax of the model's full logits at each response
    token, read from the position before it (left-padded prompts, right-padded answers)."""
    model, b = qwen3(), batch()
    monkeypatch.setattr(rollout, "LOGP_CHUNK_ELEMENTS", 2 * len(b) * V)
    with torch.no_grad():
        got = rollout.response_logp(model, b, TEMPERATURE)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       position_ids=b.position_ids).logits
    P, R = b.prompt_len, b.response_mask.shape[1]
    ref = torch.log_softmax(logits[:, P - 1:P + R - 1] / TEMPERATURE, -1)
    ref = ref.gather(-1, b.input_ids[:, P:, None])[..., 0]
    mask = b.response_mask.bool()
    assert got.dtype == torch.float64  # scored in fp32 or wider: bf16/fp32 models in fp32, this one in fp64
    assert torch.allclose(got[mask], ref[mask], rtol=0, atol=1e-12)
    with torch.no_grad():
        assert rollout.response_logp(model.float(), b, TEMPERATURE).dtype == torch.float32


def test_head_is_put_back_even_when_the_forward_fails(monkeypatch):
    model, b = qwen3(), batch()
    head = model.get_output_embeddings()
    monkeypatch.setattr(rollout, "LOGP_CHUNK_ELEMENTS", 2 * len(b) * V)
    rollout.response_logp(model, b)
    assert "forward" not in vars(head)

    def boom(*_):
        raise ValueError("boom")

    hook = model.model.norm.register_forward_pre_hook(boom)
    with pytest.raises(ValueError, match="boom"):
        rollout.response_logp(model, b)
    hook.remove()
    assert "forward" not in vars(head)
    assert model(input_ids=b.input_ids).logits.shape[-1] == V  # plain logits again

    calls = []  # a forward set on the instance (as accelerate's hooks do) is used, and kept
    wrapped = head.forward = lambda x: calls.append(1) or torch.nn.Linear.forward(head, x)
    rollout.response_logp(model, b)
    assert len(calls) == 4 and vars(head)["forward"] is wrapped  # one call per chunk


def test_softcapped_model_takes_the_unchunked_path(monkeypatch, count_chunks):
    """Gemma2 softcaps its logits after the head: chunking the bare head would be wrong."""
    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model, b = Gemma2ForCausalLM(cfg).double(), batch()
    monkeypatch.setattr(rollout, "LOGP_CHUNK_ELEMENTS", 2 * len(b) * V)
    with torch.no_grad():
        got = rollout.response_logp(model, b)
        ref = rollout.response_logp(model, b, chunked=False)
    assert count_chunks == [] and torch.equal(got, ref)


def test_unknown_logit_postprocessing_is_refused(monkeypatch):
    class Scaled(Qwen3ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0  # not declared in the config
            return out

    torch.manual_seed(0)
    model, b = Scaled(qwen3().config).double(), batch()
    monkeypatch.setattr(rollout, "LOGP_CHUNK_ELEMENTS", 2 * len(b) * V)
    with pytest.raises(RuntimeError, match="LOGIT_POSTPROCESSING"):
        rollout.response_logp(model, b)
    assert "forward" not in vars(model.get_output_embeddings())


def test_fsdp2_step_gradients_do_not_depend_on_chunking(tmp_path):
    """2 ranks, gloo, the real build_student + train_step, tied embeddings (as Qwen3's
    small models): chunked (3 chunks, checkpointed) vs unchunked."""
    qwen3(vocab=131, tie=True, dtype=torch.float32).save_pretrained(tmp_path / "student")
    out = tmp_path / "out.json"
    r = run_cmd([TORCHRUN, "--nproc_per_node=2", "tests/logprobs_worker.py", str(tmp_path / "student"), str(out)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["n_chunks"] == 3 and d["fsdp_warnings"] == [], d
    assert d["n_grads"] == d["n_params"] > 0 and d["grad_max"] > 1e-3, d
    assert d["logp_diff"] < 1e-5 and d["grad_diff"] < 1e-5 * d["grad_max"], d
    for key in ("loss", "grad_norm", "kl"):
        assert d["sums"][key] == pytest.approx(d["ref_sums"][key], rel=1e-5), key


@pytest.mark.parametrize("positions", [1, 3, 100])
def test_topk_and_distribution_kl_do_not_depend_on_chunk_size(monkeypatch, positions):
    """The teacher's top-k (values, ids) and the student's KL to it (values and gradients)
    are the same at any chunk size (issue 12)."""
    import loss

    teacher, student, b = qwen3(seed=1), qwen3(seed=2), batch()

    def run():
        with torch.no_grad():
            t_logp, vals, ids = rollout.response_logp(teacher, b, topk=5)
        student.zero_grad(set_to_none=True)
        kl_to = lambda s, sl: torch.stack([loss.reverse_kl_topk(s, vals[:, sl], ids[:, sl]),
                                           loss.reverse_kl_full(s, full_t[:, sl])], -1)
        logp, kl = rollout.response_logp(student, b, TEMPERATURE, kl_to=kl_to)
        (kl * b.response_mask[..., None]).sum().backward()
        return t_logp, vals, ids, logp.detach(), kl.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}

    with torch.no_grad():  # the teacher's whole distribution, unchunked, for the full KL and a check
        logits = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        full_t = logits[:, b.prompt_len - 1:-1].log_softmax(-1)
    ref = run()
    monkeypatch.setattr(rollout, "LOGP_CHUNK_ELEMENTS", positions * len(b) * V)
    got = run()
    assert torch.equal(got[2], ref[2])  # ids
    for a, r in zip(got[:2] + got[3:5], ref[:2] + ref[3:5]):
        assert torch.allclose(a, r, rtol=0, atol=1e-12)
    for n, g in ref[5].items():
        assert torch.allclose(got[5][n], g, rtol=1e-10, atol=1e-12), n
    top, top_ids = full_t.topk(5, -1)  # the top-k is the full distribution's, normalised over V
    assert torch.allclose(ref[1], top, atol=1e-12) and torch.equal(ref[2], top_ids)
    assert (ref[4][..., 0] <= ref[4][..., 1] + 1e-12).all() and (ref[4][..., 0] >= -1e-12).all()
