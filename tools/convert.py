"""HF ↔ Megatron checkpoint conversion at any layout, through parallel.hf_bridge (megatron-bridge).

    python -m tools.convert import HF_DIR CKPT_DIR [model=... parallel=...]
    python -m tools.convert export CKPT_DIR HF_DIR [model=... parallel=...]

Run under torchrun (or srun) with parallel=... to import straight into a TP/PP/EP layout; a checkpoint
loads at any other layout later. Export writes config.json + model.safetensors that transformers and
vLLM load. Overrides are the same Hydra overrides as the stages (model= must match the checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import parallel  # noqa: F401  (CPU compatibility layer before megatron loads)
from core.compose import compose
from core.errors import ConfigError
from core.run_tokenizer import run_tokenizer, tokenizer_dir_of
from parallel import checkpoint as ckpt
from parallel import hf_bridge
from parallel import parallelize as P
from parallel.policy import build_policy

USAGE = "usage: python -m tools.convert {import HF_DIR CKPT_DIR | export CKPT_DIR HF_DIR} [overrides]"


def convert(direction: str, src: Path, dst: Path, overrides: list[str]) -> None:
    cfg = compose(overrides)
    P.init_distributed(cfg)
    try:
        policy = build_policy(cfg, with_optimizer=False)
        if direction == "import":
            if not (src / "config.json").exists():
                raise ConfigError(
                    f"{src}: no config.json. Fix: pass an HF checkpoint dir (config.json + *.safetensors)."
                )
            # The model's tokenizer goes with its weights (DST/tokenizer): later stages read it from there.
            if tokenizer_dir_of(src) is None:
                raise ConfigError(
                    f"{src}: no tokenizer files (tokenizer.json, tokenizer_config.json). Fix: copy the model's "
                    "tokenizer files into it, so every stage reads the tokens it was trained with."
                )
            run_tokenizer(cfg, weights_from=src, run_dir=dst, write=P.is_rank0())
            hf_bridge.import_hf(policy, src)
            ckpt.save(policy, dst, with_optimizer=False, extra={"imported_from": str(src)})
        else:
            ckpt.load(policy, ckpt.resolve(src), with_optimizer=False)
            hf_bridge.save_hf(policy, dst, tokenizer=run_tokenizer(cfg, weights_from=src))
    finally:
        P.shutdown()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] not in ("import", "export"):
        sys.exit(USAGE)
    try:
        convert(argv[0], Path(argv[1]), Path(argv[2]), argv[3:])
    except (ConfigError, ckpt.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"convert error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
