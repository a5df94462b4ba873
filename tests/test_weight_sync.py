"""After a weight sync, vLLM samples from exactly the trainer's policy (fp32; 1 rank, whose
FSDP2 shard is the whole tensor and is not gathered, and 2 ranks)."""

import json

import pytest

from conftest import TORCHRUN, run_cmd


@pytest.mark.parametrize("ranks,tp", [(1, 1), (2, 1), (2, 2)],
                         ids=["1-rank", "2-replicas", "tp2-external-launcher"])
def test_sampler_logprobs_follow_weight_sync(tiny, tmp_path, ranks, tp):
    out = tmp_path / "diffs.json"
    r = run_cmd([TORCHRUN, f"--nproc_per_node={ranks}", "tests/sync_worker.py", tiny["student"], str(out),
                 str(tp)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["start"] < 1e-4, d        # same weights: vLLM and the trainer agree
    assert d["before"] > 1e-2, d       # the step changed the policy; the engine is stale
    assert d["after"] < 1e-4, d        # synced: the sampler follows the trainer again
