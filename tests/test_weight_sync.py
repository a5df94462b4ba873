"""After a weight sync, vLLM samples from exactly the trainer's policy (fp32; 1 rank, whose
FSDP2 shard is the whole tensor and is not gathered, and 2 ranks; untied and tied heads)."""

import json

import pytest

from conftest import TORCHRUN, run_cmd


@pytest.fixture(scope="module")
def tied_student(tiny, tmp_path_factory):
    """Like most small real models (Qwen3-0.6B..4B, SmolLM2, Llama-3.2-1B): the output
    head is the input embedding."""
    import toy

    path = str(tmp_path_factory.mktemp("tied") / "student")
    toy.save_pretrained(toy.build_model(tiny["tokenizer"], seed=0, tie_word_embeddings=True),
                        tiny["tokenizer"], path)
    return path


@pytest.mark.parametrize("ranks,tp,tied", [(1, 1, False), (2, 1, False), (2, 2, False), (1, 1, True),
                                          (2, 1, True)],
                         ids=["1-rank", "2-replicas", "tp2-external-launcher", "tied-1-rank", "tied-2-replicas"])
def test_sampler_logprobs_follow_weight_sync(tiny, tied_student, tmp_path, ranks, tp, tied):
    out = tmp_path / "diffs.json"
    model = tied_student if tied else tiny["student"]
    r = run_cmd([TORCHRUN, f"--nproc_per_node={ranks}", "tests/sync_worker.py", model, str(out), str(tp)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["start"] < 1e-4, d        # same weights: vLLM and the trainer agree
    assert d["before"] > 1e-2, d       # the step changed the policy; the engine is stale
    assert d["after"] < 1e-4, d        # synced: the sampler follows the trainer again
