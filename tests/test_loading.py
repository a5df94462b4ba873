"""Sharded loading (loading.py): every rank reads only its FSDP2 shards from the safetensors
file(s), and the model it gets is exactly the checkpoint (same parameters, buffers and
logits as `from_pretrained`), for tied and untied heads, a bf16 file into an fp32 model, a
sharded checkpoint with uneven shards, and through build_student / load_teacher; plus the
error for a missing weight and the per-rank memory estimate."""

import json
import os
import shutil

import pytest
import torch

from conftest import TORCHRUN, run_cmd


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    import toy

    d, tok = tmp_path_factory.mktemp("loading"), tiny["tokenizer"]
    paths = {"untied": tiny["student"], "tied": str(d / "tied"), "bf16": str(d / "bf16"),
             "sharded": str(d / "sharded")}
    toy.save_pretrained(toy.build_model(tok, seed=2, tie_word_embeddings=True), tok, paths["tied"])
    toy.build_model(tok, seed=3).to(torch.bfloat16).save_pretrained(paths["bf16"])
    # an odd MLP width: 97 rows split 49 + 48 over 2 ranks; 40 KB shards: ~a dozen files
    toy.build_model(tok, seed=4, intermediate_size=97).save_pretrained(paths["sharded"], max_shard_size="40KB")
    assert os.path.exists(os.path.join(paths["sharded"], "model.safetensors.index.json"))
    return paths


@pytest.mark.parametrize("ranks", [1, 2])
def test_sharded_load_equals_from_pretrained(models, tmp_path, ranks):
    out = tmp_path / "loaded.json"
    cases = {"untied": (models["untied"], "float32", "fsdp"), "tied": (models["tied"], "float32", "fsdp"),
             "bf16_file_fp32_model": (models["bf16"], "float32", "fsdp"),
             "sharded_index": (models["sharded"], "float32", "fsdp"),
             "student": (models["tied"], "float32", "student"),
             "teacher_bf16": (models["untied"], "bfloat16", "teacher")}
    r = run_cmd([TORCHRUN, f"--nproc_per_node={ranks}", "tests/loading_worker.py", str(out)]
                + [f"{name}={p}:{dt}:{how}" for name, (p, dt, how) in cases.items()], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = json.loads(out.read_text())
    for name, d in got.items():
        assert d["param_diff"] == 0.0, (name, d)    # every parameter, all-gathered, is the file's
        assert d["buffers_diff"] == 0.0, (name, d)  # rotary inv_freq survived to_empty
        assert d["logits_diff"] < 1e-5, (name, d)
        assert d["training"] is False, (name, d)    # eval mode, as from_pretrained returns it
    for name in ("tied", "student"):  # the head is still the embedding's tensor after FSDP2
        assert got[name]["tied"] and got[name]["n_params"] == got["untied"]["n_params"] - 1, got[name]
    assert not got["untied"]["tied"]
    assert got["teacher_bf16"]["requires_grad"] is False and got["student"]["requires_grad"] is True
    # each rank holds its chunk only: ceil(97 / 2) = 49 rows, then 48
    assert got["sharded_index"]["up_rows"] == ([97] if ranks == 1 else [49, 48])
    assert got["untied"]["up_rows"] == [128 // ranks] * ranks


def test_missing_weight_is_a_clear_error(models, tmp_path):
    """A weight the model needs but the checkpoint lacks names the key and the file."""
    from safetensors.torch import load_file, save_file

    import loading

    path = tmp_path / "no_head"
    shutil.copytree(models["untied"], path)
    state = load_file(str(path / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(loading.LoadError, match=r"lm_head\.weight is not in the checkpoint .*model\.safetensors"):
        loading.build_sharded(str(path), dtype=torch.float32, shard=lambda m: None, device="cpu")


def test_unsharded_load_without_a_process_group(models):
    """shard=no-op: plain tensors load whole (no torch.distributed needed)."""
    from transformers import AutoModelForCausalLM

    import loading

    model = loading.build_sharded(models["bf16"], dtype=torch.float32, shard=lambda m: None, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(models["bf16"], dtype=torch.float32)
    ref_state = ref.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref_state[name]), name
    assert model.lm_head.weight.abs().sum() > 0


def test_memory_estimate_by_hand(models, tiny):
    """Parameter counts from the config, then bytes per rank, against a hand computation."""
    from transformers import AutoConfig

    import loading

    c = AutoConfig.from_pretrained(models["untied"])
    H, V, I, hd = c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim
    block = H * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * hd + 3 * H * I + 2 * H
    root_untied, root_tied = 2 * V * H + H, V * H + H
    n_untied, n_tied = root_untied + 2 * block, root_tied + 2 * block
    assert loading.param_counts(models["untied"]) == (n_untied, block, root_untied)
    assert loading.param_counts(models["tied"]) == (n_tied, block, root_tied)

    teachers = [("math", tiny["teacher"], "bfloat16", [1]), ("general", models["tied"], "float32", [])]
    est = loading.estimate_bytes(models["untied"], "bfloat16", teachers, 2, "bfloat16", 1, 0.5, "cpu")
    worst = [k for k in est if k.startswith("teacher shards")]
    assert worst == ["teacher shards on the worst rank (1: math bfloat16/1, general float32/2)"]
    expected = {
        "student params+grads+AdamW (fp32, sharded)": n_untied * 16 / 2,
        worst[0]: n_untied * 2 + n_tied * 4 / 2,
        # the tied fp32 teacher's root + block (4 bytes) beats the bf16 models' (2 bytes)
        "gathered: root unit + one block (largest model, compute dtype)": (root_tied + block) * 4,
        "vLLM weights (bfloat16)": n_untied * 2,
        "vLLM KV cache": 2**30,
    }
    with open("/proc/meminfo") as f:
        mem = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) * 1024
    assert {k: v for k, v in est.items() if k not in ("total", "available")} == expected
    assert est["total"] == sum(expected.values())
    assert est["available"] == mem / int(os.environ.get("LOCAL_WORLD_SIZE", 2))
    lines = loading.memory_estimate(models["untied"], "bfloat16", teachers, 2)
    assert "activations not counted" in lines[0] and lines[-1].endswith("fits")
    assert len(lines) == 2 + len(expected)
