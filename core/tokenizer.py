"""Character-level Hugging Face tokenizer, built locally (no hub access needed).

Every alphabet character is one token and every special token (``<think>``,
``<answer>``, ...) is one token that is matched whole inside text, so
``"<think>1+2</think>"`` -> ``[<think>, 1, +, 2, </think>]``. Characters outside the
alphabet become ``<unk>`` instead of vanishing. Encoding with
``add_special_tokens=True`` (the default, and what vLLM does with prompts) prepends
``<bos>``; ``decode(encode(s, add_special_tokens=False)) == s`` for any string of
alphabet characters and special tokens.
"""

from __future__ import annotations

import json
import os
import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from core.tags import TOOL_TAGS

# \x0b and \x0c are left out: nobody writes them on purpose, and many text tools
# treat them as line breaks, which would make round trips surprising.
DEFAULT_ALPHABET: str = string.printable.replace("\x0b", "").replace("\x0c", "")

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
DEFAULT_SPECIAL_TOKENS: list[str] = [PAD, BOS, EOS, "<think>", "</think>", "<answer>", "</answer>"]
# Tool-integrated reasoning's tags (core.tags.TOOL_TAGS) are appended after the alphabet, so every id the
# tokenizer had before they were added stays where it was.


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET,
    special_tokens: list[str] | None = None,
    tags: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """One token per alphabet character plus one per special token (``<unk>`` is always added) and one
    per tag (``TOOL_TAGS`` by default).

    ``<pad>``/``<bos>``/``<eos>``/``<unk>`` are special (dropped by
    ``decode(..., skip_special_tokens=True)``); the other special tokens are single,
    whole-matched tokens that decoding always keeps.

    Ids: special tokens first (``<pad>`` = 0 with the defaults), then the alphabet in order, then the tags
    (matched whole and kept by decoding, like ``<think>``).
    """
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    tags = list(TOOL_TAGS if tags is None else tags)
    for required in (PAD, BOS, EOS, UNK):
        if required not in specials:
            specials.append(required)
    if len(set(specials + tags)) != len(specials + tags):
        raise ValueError(f"duplicate special tokens or tags: {specials + tags}")
    if not alphabet:
        raise ValueError("alphabet is empty")

    vocab: dict[str, int] = {}
    for tok in [*specials, *alphabet, *tags]:
        vocab.setdefault(tok, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Oniguruma has no (?s) flag, so "[\s\S]" is how to say "any char, newline included".
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Without Fuse the default decoder joins tokens with spaces, which breaks round trips.
    tok.decoder = decoders.Fuse()
    control = {PAD, BOS, EOS, UNK}
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials if s in control])
    # Tags like <think> are added as *non-special* tokens: still one id and matched whole,
    # but kept by decode(skip_special_tokens=True), which vLLM uses by default -- the
    # R1 format reward has to see them in the completion text.
    whole = [s for s in specials if s not in control] + tags
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in whole])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # transformers' clean-up rewrites " ." -> "." etc., which would break round trips.
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | os.PathLike) -> None:
    tok.save_pretrained(str(path))
    # transformers 5 records its internal class name "TokenizersBackend", which 4.x
    # (e.g. an older vLLM install) cannot resolve; both resolve "PreTrainedTokenizerFast".
    cfg_path = os.path.join(str(path), "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    if not os.path.isdir(path):
        # from_pretrained would otherwise treat the string as a hub repo id.
        raise FileNotFoundError(f"tokenizer directory not found: {path} (create it with save_tokenizer)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
