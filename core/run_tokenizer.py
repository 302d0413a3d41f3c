"""The one tokenizer a run uses, wherever its model came from, and the checks that it fits that model.

Where it comes from, in order (all that apply must agree, or the run is refused naming both):
  1. model.path: the HF model directory (its tokenizer files, chat template and generation_config.json);
  2. the weights the stage starts from (stage.init_from, a teacher, a reward model...): the tokenizer saved
     beside them, i.e. an HF directory's own, or RUN_DIR/tokenizer of the run that wrote the checkpoint;
  3. data.tokenizer: a tokenizer directory, or "char", the embedded demo's character tokenizer, which is
     used only when nothing above names one.
Every stage saves the tokenizer it used as RUN_DIR/tokenizer, so the next stage, tools.eval and the
export read the same one, and a resumed run is refused if its tokenizer changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from core.errors import ConfigError
from core.tokenizer import build_char_tokenizer, load_tokenizer, save_tokenizer

TOKENIZER_DIR = "tokenizer"  # under every run dir
GENERATION_CONFIG = "generation_config.json"
CHAR = "char"


def tokenizer_dir_of(path: str | os.PathLike) -> Path | None:
    """The tokenizer directory of what a config path names: an HF model or tokenizer dir itself, a run
    dir's tokenizer/, a checkpoint root's or step dir's run dir's tokenizer/; None if there is none."""
    p = Path(path)
    for d in (p, p / TOKENIZER_DIR, p.parent / TOKENIZER_DIR, p.parent.parent / TOKENIZER_DIR):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return d
    return None


def read_tokenizer(path: str | os.PathLike, what: str):
    """The tokenizer in directory `path`, with the extra stop ids its generation_config.json lists
    (`tok.generation_eos_ids`); a missing pad token becomes EOS (pads are masked out everywhere)."""
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot load the tokenizer in {path}: {e}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    gen = Path(path) / GENERATION_CONFIG
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    tok.generation_eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    return tok


def stop_token_ids(tok) -> tuple[int, ...]:
    """Every id that ends a completion: the tokenizer's EOS and generation_config.json's eos_token_id."""
    return tuple(sorted({tok.eos_token_id, *getattr(tok, "generation_eos_ids", [])}))


def fingerprint(tok) -> str:
    """Equal for tokenizers that map every string to the same ids and stop on the same ids."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps([vocab, tok.bos_token_id, stop_token_ids(tok)], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_fits(tok, vocab_size: int, source: str) -> None:
    """ConfigError unless every id the tokenizer produces has an embedding row and generation can stop."""
    if tok.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer from {source} has no EOS token, so generation could never stop. Fix: set eos_token "
            "in its tokenizer_config.json (or eos_token_id in generation_config.json)."
        )
    if len(tok) > vocab_size:
        raise ConfigError(
            f"the tokenizer from {source} has {len(tok)} tokens but model.vocab_size={vocab_size}: ids "
            f"{vocab_size}..{len(tok) - 1} would have no embedding. Fix: use the model's own tokenizer, or a "
            f"model with vocab_size >= {len(tok)}."
        )
    named = [(f"{n} id", getattr(tok, f"{n}_token_id")) for n in ("pad", "bos", "eos")]
    named += [("generation_config.json eos_token_id", i) for i in getattr(tok, "generation_eos_ids", [])]
    for name, tid in named:
        if tid is not None and not 0 <= tid < vocab_size:
            raise ConfigError(
                f"the tokenizer from {source} has {name} {tid}, outside the model's vocabulary "
                f"(0..{vocab_size - 1}). Fix: name a token of the vocabulary there."
            )


def require_same(tok, source: str, other_dir: Path | None, what: str) -> None:
    """ConfigError if `what` (a model this run reads) was trained with another tokenizer than this run's."""
    if other_dir is None:
        return
    other = read_tokenizer(other_dir, what)
    if fingerprint(other) != fingerprint(tok):
        raise ConfigError(
            f"{what} uses the tokenizer in {other_dir} ({len(other)} tokens), but this run's comes from "
            f"{source} ({len(tok)} tokens): the same ids would mean other text. Fix: use models and data "
            "settings that share one tokenizer (the same model family and stage chain)."
        )


def run_tokenizer(cfg, weights_from=None, run_dir: str | os.PathLike | None = None, write: bool = False):
    """This run's tokenizer (see the module doc), checked against model.vocab_size and against the one
    `run_dir`/tokenizer already holds (a resumed run); written there when `write` (rank 0). Without
    `run_dir` (tools that only read models) nothing is kept."""
    weights_from = cfg.stage.init_from if weights_from is None else weights_from
    sources: list[tuple[str, Path]] = []
    if cfg.model.path:
        found = tokenizer_dir_of(cfg.model.path)
        if found is None:
            raise ConfigError(
                f"model.path={cfg.model.path} has no tokenizer files. Fix: copy the model's tokenizer.json "
                "and tokenizer_config.json into it."
            )
        sources.append((f"model.path={cfg.model.path}", found))
    if weights_from and (found := tokenizer_dir_of(weights_from)) is not None:
        sources.append((f"the weights' source {weights_from}", found))
    if cfg.data.tokenizer != CHAR:
        sources.append((f"data.tokenizer={cfg.data.tokenizer}", Path(cfg.data.tokenizer)))
    if sources:
        source, where = sources[0]
        tok = read_tokenizer(where, source)
        # The same directory named twice (model.path=DIR stage.init_from=DIR) is read once.
        seen = {where.resolve()}
        for what, other in sources[1:]:
            if other.resolve() not in seen:
                seen.add(other.resolve())
                require_same(tok, source, other, what)
    else:
        source, tok = "data.tokenizer=char (the demo's character tokenizer)", build_char_tokenizer()
        tok.generation_eos_ids = []
    check_fits(tok, cfg.model.vocab_size, source)
    if run_dir is None:
        return tok
    saved = Path(run_dir) / TOKENIZER_DIR
    if saved.is_dir():  # written whole by one rename: every rank sees all of it or nothing
        require_same(tok, source, saved, f"this run's checkpoints (run_dir={run_dir})")
    elif write:
        write_tokenizer(tok, saved)
    return tok


def write_tokenizer(tok, path: str | os.PathLike) -> None:
    """The tokenizer files and generation_config.json (save_tokenizer_files), written to a
    temporary directory renamed into place, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".tmp.{path.name}.{os.getpid()}")
    save_tokenizer_files(tok, tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def save_tokenizer_files(tok, path: str | os.PathLike) -> None:
    """Tokenizer files (chat template included) and generation_config.json with every stop id, which
    transformers' generate and vLLM read from a model directory."""
    save_tokenizer(tok, path)
    gen = {
        "eos_token_id": list(stop_token_ids(tok)),
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    (Path(path) / GENERATION_CONFIG).write_text(json.dumps(gen) + "\n")
