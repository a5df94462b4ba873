"""Prompt data: jsonl in the seed format, chat templates, and per-step batches.

Owns reading and validating the records (`id, source, difficulty, prompt, messages, tag,
ground_truth, test_cases`), rendering each prompt with the tokenizer's chat template,
dropping (and counting) prompts longer than `prompt_length`, and handing every
data-parallel rank its slice of each global batch, reshuffled every epoch from the seed.

Simplified: one chat template for all tags (the tokenizer's own); every record is
tokenized once at start-up.
"""

import json

import torch


class DataError(ValueError):
    """Bad input data: the message names the file and line."""


def read_jsonl(paths):
    """All records of the given jsonl files, each checked to carry a prompt."""
    records = []
    for path in paths:
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise DataError(f"data.file_name: cannot read {path}: {e.strerror}") from None
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                rec["messages"] = _messages(rec, f"{path}:{lineno}")
                records.append(rec)
    if not records:
        raise DataError(f"data.file_name: no records in {', '.join(paths)}")
    return records


def _messages(rec, where):
    """The record's chat: `messages` (a list or a JSON string) wins over `prompt`."""
    msgs = rec.get("messages")
    if isinstance(msgs, str) and msgs.strip():
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field 'messages' is a string but not JSON ({e.msg})") from None
    if msgs:
        if not (isinstance(msgs, list) and all(isinstance(m, dict) and "content" in m for m in msgs)):
            raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
        return msgs
    if isinstance(rec.get("prompt"), str) and rec["prompt"]:
        return [{"role": "user", "content": rec["prompt"]}]
    raise DataError(f"{where}: record has neither 'prompt' nor 'messages'")


def encode_prompts(records, tokenizer, prompt_length):
    """Token ids of every record's rendered prompt; over-long ones are dropped.

    Returns (kept, n_skipped) where kept is a list of (token_ids, record)."""
    kept, skipped = [], 0
    for rec in records:
        text = tokenizer.apply_chat_template(rec["messages"], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > prompt_length:
            skipped += 1
            continue
        kept.append((ids, rec))
    return kept, skipped


class PromptBatches:
    """Endless global batches of `batch_size` prompts; this rank gets its slice.

    Every rank draws the same permutation (seeded by seed + epoch), so the global batch
    is the same everywhere and the slices are disjoint."""

    def __init__(self, items, batch_size, *, seed, dp_rank=0, dp_size=1):
        if len(items) < batch_size:
            raise DataError(f"rollout_batch_size={batch_size} but only {len(items)} usable prompts")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.order, self.pos = -1, [], 0

    def next(self):
        if self.pos + self.batch_size > len(self.order):
            self.epoch += 1
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self.order, self.pos = torch.randperm(len(self.items), generator=g).tolist(), 0
        batch = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        share = self.batch_size // self.dp_size
        mine = batch[self.dp_rank * share:(self.dp_rank + 1) * share]
        return [self.items[i] for i in mine]
