"""Prompt data: jsonl in the seed format, chat templates, and per-step batches.

Owns reading and validating the records (`id, source, difficulty, prompt, messages, tag,
ground_truth, test_cases`), rendering each prompt with the tokenizer's chat template
(chosen per tag: `global_template`, `tag_to_template`), dropping (and counting) prompts
longer than `prompt_length`, mixing domains by `domain_interleave_probs`, and handing
every data-parallel rank its slice of each global batch.

Simplified: every record is tokenized once at start-up; a template is the tokenizer's own
chat template plus keyword arguments, not a string format of our own.
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
                rec["_where"] = f"{path}:{lineno}"  # for later errors about this record
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


# Named chat-template variants. Each is the tokenizer's own template (apply_chat_template)
# rendered with extra keyword arguments, so a real Qwen3 tokenizer gets Qwen3's template.
TEMPLATES = {
    "native": {},                                 # the tokenizer's template as it is
    "qwen3": {"enable_thinking": True},           # Qwen3, thinking mode
    "qwen3_nothink": {"enable_thinking": False},  # Qwen3, empty <think></think> block
}


def check_templates(global_template, tag_to_template):
    for where, name in [("global_template", global_template),
                        *((f"tag_to_template.{t}", n) for t, n in tag_to_template.items())]:
        if name not in TEMPLATES:
            raise DataError(f"{where}: unknown template {name!r}; known: {', '.join(TEMPLATES)}")


def render(tokenizer, messages, template):
    """The prompt text of a chat, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **TEMPLATES[template])


def encode_prompts(records, tokenizer, prompt_length, global_template="native", tag_to_template=None):
    """Token ids of every record's rendered prompt; over-long ones are dropped.

    The template is `tag_to_template[tag]`, else `global_template`.
    Returns (kept, n_skipped) where kept is a list of (token_ids, record)."""
    tag_to_template = tag_to_template or {}
    check_templates(global_template, tag_to_template)
    kept, skipped = [], 0
    for rec in records:
        template = tag_to_template.get(rec.get("tag", ""), global_template)
        ids = tokenizer(render(tokenizer, rec["messages"], template), add_special_tokens=False)["input_ids"]
        if len(ids) > prompt_length:
            skipped += 1
            continue
        kept.append((ids, rec))
    return kept, skipped


def load_prompts(files, tokenizer, prompt_length, global_template="native", tag_to_template=None,
                 users=None):
    """Read, render and filter prompt files: drop prompts longer than `prompt_length` and
    prompts whose tag none of `users` handles (each a tag list; an empty list = all tags;
    None = keep every tag). Returns (items, notes): notes say what was skipped and why."""
    records = read_jsonl(files)
    items, too_long = encode_prompts(records, tokenizer, prompt_length, global_template,
                                     tag_to_template)
    notes = []
    if too_long:
        notes.append(f"skipped {too_long}/{len(records)} prompts of {files} longer than "
                     f"prompt_length={prompt_length}")
    if users is not None:
        handled = lambda tag: any(not tags or tag in tags for tags in users)
        orphans = sorted({rec.get("tag", "") for _, rec in items if not handled(rec.get("tag", ""))})
        if orphans:
            n = sum(rec.get("tag", "") in orphans for _, rec in items)
            notes.append(f"skipped {n} records of {files} whose tag no teacher and no reward "
                         f"handles: {orphans}")
            items = [it for it in items if it[1].get("tag", "") not in orphans]
    return items, notes


def teacher_answers(items, n, max_tokens):
    """Whether the prompts carry the teacher's answers (`teacher_completion_ids`, written
    by teacher_data.py) for off-policy SFT: all of them, or none. Each needs at least `n`
    answers of at most `max_tokens` tokens; a record that breaks this stops the run here,
    named by file:line, not mid-run."""
    has = [isinstance(rec.get("teacher_completion_ids"), list) for _, rec in items]
    if not any(has):
        return False
    for (_, rec), ok in zip(items, has):
        where = rec.get("_where", "?")
        if not ok:
            raise DataError(f"{where}: no teacher_completion_ids, but other records have them; write every "
                            "prompt's answers with teacher_data.py, or none")
        answers = rec["teacher_completion_ids"]
        if len(answers) < n:
            raise DataError(f"{where}: {len(answers)} teacher answers, num_return_sequences_in_group={n} "
                            "needs that many per prompt")
        for a in answers[:n]:
            if not a or not all(isinstance(t, int) for t in a):
                raise DataError(f"{where}: teacher_completion_ids holds an empty or non-integer answer")
            if len(a) > max_tokens:
                raise DataError(f"{where}: a teacher answer of {len(a)} tokens, longer than "
                                f"response_length={max_tokens}")
    return True


class _Stream:
    """Item indices in a fresh seeded permutation every epoch."""

    def __init__(self, indices, seed):
        self.indices, self.seed, self.epoch, self.order = indices, seed, -1, []

    def take(self):
        if not self.order:
            self.epoch += 1
            g = torch.Generator().manual_seed(self.seed + 1000 * self.epoch)
            self.order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=g)]
            self.order.reverse()  # pop() from the end = the permutation's order
        return self.order.pop()


class PromptBatches:
    """Endless global batches of `batch_size` prompts; this rank gets its slice.

    Without `domain_probs` every epoch is one seeded permutation of all items. With it,
    each slot of a batch first draws a domain with the given probabilities, then the
    next item of that domain's own permutation (`domains`: name -> item indices). Every
    rank draws the same global batch (same seeds), so the slices are disjoint."""

    def __init__(self, items, batch_size, *, seed, dp_rank=0, dp_size=1, domains=None,
                 domain_probs=None):
        if len(items) < batch_size:
            raise DataError(f"rollout_batch_size={batch_size} but only {len(items)} usable prompts")
        self.items, self.batch_size = items, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        if domain_probs:
            for name in domain_probs:
                if not (domains or {}).get(name):
                    raise DataError(f"domain_interleave_probs.{name}: no usable prompt has a tag of "
                                    f"domain '{name}'")
            names = list(domain_probs)
            self.streams = [_Stream(domains[n], seed + 7919 * i) for i, n in enumerate(names)]
            self.probs = torch.tensor([float(domain_probs[n]) for n in names])
        else:
            self.streams, self.probs = [_Stream(list(range(len(items))), seed)], torch.ones(1)
        self.g = torch.Generator().manual_seed(seed)

    def next(self):
        picks = torch.multinomial(self.probs, self.batch_size, replacement=True, generator=self.g)
        batch = [self.streams[i].take() for i in picks.tolist()]
        share = self.batch_size // self.dp_size
        mine = batch[self.dp_rank * share:(self.dp_rank + 1) * share]
        return [self.items[i] for i in mine]

    def state_dict(self):
        """The position in the data (for an exact resume): each stream's epoch and what is
        left of its permutation, and the generator that draws domains."""
        return {"g": self.g.get_state(), "streams": [(s.epoch, list(s.order)) for s in self.streams],
                "n_items": len(self.items)}

    def load_state_dict(self, state):
        if state["n_items"] != len(self.items):  # the saved order indexes the prompts of then
            raise DataError(f"resume: the checkpoint was written with {state['n_items']} usable prompts, the "
                            f"data now gives {len(self.items)}; resume with the same data files and prompt_length")
        self.g.set_state(state["g"])
        for s, (epoch, order) in zip(self.streams, state["streams"]):
            s.epoch, s.order = epoch, list(order)
