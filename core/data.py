"""Local datasets for pretraining, SFT and RL, plus sequence packing.

Files are JSON lines (``.jsonl`` / ``.json``, one object per line, blank lines
skipped) or ``.parquet``. Each row is an object; the required fields depend on the
kind of data, and every other field is kept as is:

* ``"prompt"`` (RL rollouts, eval): ``prompt`` (str), ``answer`` (str, the reference
  final answer the reward compares against).
* ``"sft"`` (supervised fine-tuning): ``prompt`` (str), ``response`` (str, the target
  completion, e.g. ``"<think>...</think><answer>...</answer>"``); a tool-using sample also
  ``response_ids`` and ``response_tool_mask`` (its tokens, and which are the tool's: not learned).
* ``"text"`` (pretraining): ``text`` (str).
* ``"preference"`` (reward model): ``prompt``, ``chosen`` (the preferred response), ``rejected``.

Required fields must be non-empty strings. Any problem raises :class:`DataError`
naming the file, the line (or parquet row), the field and how to fix it.

Packing concatenates tokenized samples into fixed-length rows. Per-sample
``position_ids`` and ``segment_ids`` let the model restore per-sample attention with
:func:`causal_mask_from_segments`, so packed samples never see each other.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from core.errors import DataError

SCHEMAS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "answer"),
    "sft": ("prompt", "response"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


CHAT_ROLES = ("system", "user", "assistant")


def _check_messages(row: dict, where: str) -> dict:
    """A chat-format SFT row: ``messages``, a list of {role, content} with at least one assistant turn."""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {list(CHAT_ROLES)}, got {m!r:.80}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise DataError(f"{where}: messages[{i}].content must be a non-empty string; fill it in or drop the row")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn in 'messages': nothing to learn. Add one or drop the row")
    return row


def _check_row(row: Any, kind: str, where: str, keys: dict[str, str] | None = None) -> dict:
    """Validate one row against SCHEMAS[kind], whose fields the file may name otherwise (``keys``: schema
    field -> the file's, e.g. {"prompt": "question"}); ``where`` is e.g. "data.jsonl line 3". An SFT row
    may be chat-format instead: {"messages": [{"role", "content"}, ...]}."""
    fields = [(keys or {}).get(f, f) for f in SCHEMAS[kind]]
    if kind == "sft" and isinstance(row, dict) and "messages" in row:
        return _check_messages(row, where)
    if not isinstance(row, dict):
        hint = " (the file looks like a JSON array; write one object per line instead)" if isinstance(row, list) else ""
        raise DataError(f"{where}: expected a JSON object with fields {fields}, got {type(row).__name__}{hint}")
    for field in fields:
        if field not in row or row[field] is None:
            raise DataError(
                f"{where}: missing (or null) required field '{field}' for kind '{kind}' "
                f"(present: {sorted(row)}); add '{field}' as a non-empty string"
                + (" or name the file's field in data.prompt_key / data.answer_key" if kind == "prompt" else "")
            )
        value = row[field]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field '{field}' must be a string, got {type(value).__name__} "
                f"{value!r:.60}; store it as text (e.g. join a list, or str() a number)"
            )
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty or whitespace only; fill it in or drop the row")
    return row


def _read_jsonl(path: Path, kind: str, keys: dict | None) -> list[dict]:
    rows = []
    # Read bytes and decode per line so a bad encoding is also reported with its line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e}); re-save the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # also a number past int's 4300-digit limit, deep nesting
                bad = isinstance(e, json.JSONDecodeError)
                what = f"{e.msg} at column {e.colno}" if bad else f"{type(e).__name__}: {e}"
                raise DataError(
                    f"{where}: invalid JSON ({what:.200}); each line must be "
                    f"one complete JSON object, e.g. {_example(kind)}"
                ) from e
            rows.append(_check_row(obj, kind, where, keys))
    return rows


def _read_parquet(path: Path, kind: str, keys: dict | None) -> list[dict]:
    # The parquet builder is bundled with `datasets`; offline mode stops it from
    # probing the hub first. Only effective if `datasets` is not yet imported.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import pyarrow.parquet as pq

    # Checked up front: datasets' own errors are vague ("An error occurred while
    # generating the dataset"), and it fails outright on a zero-row file.
    try:
        num_rows = pq.read_metadata(path).num_rows
    except Exception as e:
        raise DataError(f"{path}: could not read as parquet ({type(e).__name__}: {e}); is it a parquet file?") from e
    if num_rows == 0:
        return []
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:
        cause = e.__cause__ or e
        raise DataError(f"{path}: could not read as parquet ({type(cause).__name__}: {cause})") from e
    return [_check_row(row, kind, f"{path} row {i} (0-based)", keys) for i, row in enumerate(ds)]


def _example(kind: str) -> str:
    return json.dumps({field: "..." for field in SCHEMAS[kind]})


def load_rows(path: str | os.PathLike, kind: str, keys: dict[str, str] | None = None) -> list[dict]:
    """Read and validate every row of a local JSONL or parquet file (``keys``: see _check_row)."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (relative paths resolve against {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(path, kind, keys)
    elif suffix in PARQUET_SUFFIXES:
        rows = _read_parquet(path, kind, keys)
    else:
        raise DataError(
            f"{path}: unknown extension {suffix!r}; use one of "
            f"{list(JSONL_SUFFIXES + PARQUET_SUFFIXES)} (.json means JSON lines)"
        )
    if not rows:
        raise DataError(f"{path}: no rows; expected at least one object like {_example(kind)}")
    return rows


def tokenize_sft(
    rows: Sequence[dict],
    tokenizer,
    max_len: int,
    truncate: bool = False,
) -> list[dict]:
    """``[bos] + prompt + response + [eos]`` with ``loss_mask`` 1 on response and eos only; a chat row
    (``messages``) through the tokenizer's chat template, loss on the assistant turns only (tokenize_chat).

    Prompt and response are tokenized separately so the mask boundary is exact even
    for tokenizers that would merge across it.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; SFT needs one to teach the model to stop")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    out = []
    for i, row in enumerate(rows):
        _check_row(row, "sft", f"sft row {i}")
        if "messages" in row:
            ids, mask = tokenize_chat(row["messages"], tokenizer, f"sft row {i}")
            prompt = ids[: mask.index(1)]
        else:
            # A chat-rendered prompt (a rollout stage's, kept by rejection sampling) already opens with BOS.
            own_bos = bos and row["prompt"].startswith(tokenizer.bos_token)
            prompt = ([] if own_bos else bos) + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            response, learn = _response(row, tokenizer, f"sft row {i}")
            ids = prompt + response
            mask = [0] * len(prompt) + learn
        if len(ids) > max_len:
            if not truncate:
                raise DataError(
                    f"sft row {i}: {len(ids)} tokens > max_len={max_len} "
                    f"(prompt {len(prompt)}, response {len(ids) - len(prompt)}); raise max_len, "
                    f"shorten or drop the row, or pass truncate=True"
                )
            if len(prompt) >= max_len:
                # Truncation would leave nothing to learn from this row.
                raise DataError(
                    f"sft row {i}: prompt alone is {len(prompt)} tokens >= max_len={max_len}, "
                    f"so no response token survives truncation; raise max_len or drop the row"
                )
            ids, mask = ids[:max_len], mask[:max_len]
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def _response(row: dict, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """The response's ids + EOS and what of them to learn. A tool-using sample kept by rejection sampling
    brings its own ids (``response_ids``, as the engine and the tool made them) and ``response_tool_mask``
    (1: the tool's output, context only); any other row's text is tokenized and learned whole."""
    eos = tokenizer.eos_token_id
    ids = row.get("response_ids")
    if not ids:
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [eos]
        return response, [1] * len(response)
    tool = row.get("response_tool_mask") or []
    if len(tool) != len(ids) or any(not 0 <= t < len(tokenizer) for t in ids):
        raise DataError(
            f"{where}: response_ids ({len(ids)} ids) need a response_tool_mask of the same length "
            f"({len(tool)}) and ids of this tokenizer (< {len(tokenizer)}). Fix: train with the tokenizer "
            "the rows were sampled with, or drop the two columns to tokenize the response text."
        )
    return [*ids, eos], [1 - int(t) for t in tool] + [1]


def tokenize_chat(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a conversation as the chat template renders it, 1 on each assistant turn's
    text and the template's end-of-turn tokens after it. Each turn is rendered on the prefix before it, so
    the template must render a conversation's prefix as a prefix (ChatML, DeepSeek's and Llama's do)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: a 'messages' row needs a tokenizer with a chat template, and this run's has none. Fix: use "
            "the model directory's tokenizer (model=hf model.path=DIR), or prompt/response rows"
        )
    render = functools.partial(tokenizer.apply_chat_template, tokenize=False)
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render turn {i} as a continuation of the turns before it "
                "(does its generation prompt add text the assistant turn does not start with?). Fix: use a "
                "template that renders a conversation's prefix as a prefix, or prompt/response rows"
            )
        segments += [(before[len(done) :], 0), (after[len(before) :], 1)]
        done = after
    full = render(messages)
    segments.append((full[len(done) :] if full.startswith(done) else "", 0))
    ids, mask = [], []
    for text, learn in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        mask += [learn] * len(piece)
    return ids, mask


def pack(samples: Iterable[dict], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """First-fit greedy packing into ``[N, seq_len]`` rows; a sample is never split.

    Each sample is a dict with ``input_ids`` and optionally ``loss_mask`` (per input
    token: 1 = learn to predict this token; default all ones). Returns:

    * ``tokens``: input ids, ``pad_id`` in padding.
    * ``labels``: ``tokens`` shifted left by one *within each sample*; the last token of
      each sample and padding get ``-100``.
    * ``loss_mask`` (float): 1 where ``labels`` is a token to learn, i.e. the sample's
      mask shifted like the labels. A sample's first token has no predecessor, so the
      total equals ``sum(loss_mask[1:])`` over samples.
    * ``position_ids``: restart at 0 for each sample (0 in padding).
    * ``segment_ids``: 0, 1, ... for the samples of a row, -1 in padding.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    samples = list(samples)
    if not samples:
        raise DataError("pack: no samples given")

    bins: list[list[int]] = []  # sample indices per row
    free: list[int] = []
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        if n == 0:
            raise DataError(f"pack: sample {i} is empty; drop it before packing")
        if n > seq_len:
            raise DataError(
                f"pack: sample {i} has {n} tokens > seq_len={seq_len}; samples are never "
                f"split across rows, so raise seq_len or truncate/drop the sample first"
            )
        mask = s.get("loss_mask")
        if mask is not None and len(mask) != n:
            raise DataError(f"pack: sample {i} has {n} input_ids but {len(mask)} loss_mask entries")
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_len - n)

    shape = (len(bins), seq_len)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for seg, i in enumerate(members):
            ids = torch.as_tensor(samples[i]["input_ids"], dtype=torch.long)
            n = len(ids)
            mask = samples[i].get("loss_mask")
            mask = torch.ones(n) if mask is None else torch.as_tensor(mask, dtype=torch.float)
            end = start + n
            tokens[r, start:end] = ids
            labels[r, start : end - 1] = ids[1:]
            loss_mask[r, start : end - 1] = mask[1:]
            position_ids[r, start:end] = torch.arange(n)
            segment_ids[r, start:end] = seg
            start = end
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
    }


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """megatron's mask convention: True where attention is not allowed."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


def random_lm_micro_batch(b: int, s: int, vocab: int, generator: torch.Generator) -> dict:
    """One micro-batch of b random-token rows of length s, every position scored (benchmarks, tests)."""
    t = torch.randint(0, vocab, (b, s + 1), generator=generator)
    return dict(
        tokens=t[:, :-1],
        labels=t[:, 1:],
        loss_mask=torch.ones(b, s),
        position_ids=torch.arange(s).expand(b, s),
        attention_mask=causal_mask(s),
    )


def causal_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask ``[N, 1, S, S]``; True = masked out (megatron convention).

    Padding (-1) forms its own causal block rather than attending to nothing: a fully
    masked query row turns softmax into NaN, and padding outputs are never in the loss.
    """
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal)[:, None]


def micro_batches(data: dict[str, torch.Tensor], rows: list[int], micro: int) -> list[dict]:
    """The model inputs of `rows` of a batch, in micro-batches of `micro`, with megatron's attention mask:
    block-causal per segment for packed rows (they carry segment_ids), plain causal otherwise. Keys beyond
    the model's (a reward model's "ends", GRPO's per-token fields) come along."""
    out = []
    for i in range(0, len(rows), micro):
        idx = torch.tensor(rows[i : i + micro])
        mb = {k: v[idx] for k, v in data.items() if k != "segment_ids"}
        mb["labels"] = mb["labels"].clamp(min=0)  # ignored positions (IGNORE_INDEX) have loss_mask 0
        if "segment_ids" in data:
            mb["attention_mask"] = causal_mask_from_segments(data["segment_ids"][idx])
        else:
            mb["attention_mask"] = causal_mask(mb["tokens"].shape[1])
        out.append(mb)
    return out


def shuffled_rows(position: int, count: int, seed: int, num_rows: int) -> list[int]:
    """Row indices at stream positions [position, position+count): epochs of seeded permutations, so
    the order depends only on (seed, position) and a resumed run reads the same rows."""
    out = []
    for pos in range(position, position + count):
        epoch, i = divmod(pos, num_rows)
        out.append(int(_permutation(seed, epoch, num_rows)[i]))
    return out


@functools.lru_cache(maxsize=2)  # called every step: keep the current epoch's (and the next) permutation
def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def trimmed_micro_batches(
    data: dict[str, torch.Tensor], rows: list[int], micro: int, multiple: int = 1, max_tokens: int = 0
) -> tuple[list[dict], list[list[int]]]:
    """`rows` longest first in micro-batches, each cut to its longest row (through its last loss position,
    rounded up to `multiple`: the tensor-parallel size under sequence parallelism) instead of the batch's
    padded width, so short completions are not computed at the longest one's length. A micro-batch holds
    `micro` rows, or with `max_tokens` as many as fit rows × its cut ≤ max_tokens (so short rows travel in
    bigger micro-batches; a longer row than max_tokens goes alone). Returns the micro-batches and the rows
    each holds, to put per-row outputs back (scatter_rows)."""
    width = data["loss_mask"].shape[1]
    scored = data["loss_mask"][rows] > 0
    last = torch.where(scored, torch.arange(width), torch.zeros((), dtype=torch.long)).amax(-1) + 1
    cut = {r: min(width, -(-n // multiple) * multiple) for r, n in zip(rows, last.tolist())}
    order = sorted(rows, key=lambda r: -cut[r])  # stable: equal lengths keep their order
    parts: list[list[int]] = []
    for r in order:  # the first row of a part is its longest
        if parts and len(parts[-1]) < (max_tokens // cut[parts[-1][0]] if max_tokens else micro):
            parts[-1].append(r)
        else:
            parts.append([r])
    out = []
    for part in parts:
        sliced = {k: v[:, : cut[part[0]]] if v.dim() >= 2 and v.shape[1] == width else v for k, v in data.items()}
        out += micro_batches(sliced, part, len(part))
    return out, parts


def scatter_rows(pieces: list[torch.Tensor], parts: list[list[int]], like: torch.Tensor) -> torch.Tensor:
    """Per-micro-batch outputs [rows, cut] back into one [all rows, width] tensor shaped as `like` (zeros
    past each cut and in rows no piece holds)."""
    out = torch.zeros_like(like)
    for piece, part in zip(pieces, parts):
        out[torch.tensor(part), : piece.shape[1]] = piece.to(out.dtype)
    return out
