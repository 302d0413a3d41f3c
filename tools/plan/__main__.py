"""Plans a layout before any GPU is rented:

    python -m tools.plan model=deepseek_v3_671b parallel=dsv3_grpo_verl_96_h20 cluster.gpus=96 cluster.gpu=h20
    python -m tools.plan model=deepseek_v3_671b parallel=dsv3_pretrain_2048_h800 --out plan.json
    python -m tools.plan --validate          # the published runs against the model (README table)

Overrides are the same Hydra overrides as `python -m rlhf.train`, composed and validated the same way.
Prints JSON; exit status 2 when the layout does not divide or does not fit, with the field and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.compose import compose
from core.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=deepseek_v3_671b cluster.gpus=96")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--validate", action="store_true", help="compare the published runs with the model")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.validate:
            from tools.plan.published import compare

            result = compare()
        else:
            from tools.plan import plan

            result = plan(compose(args.overrides))
    except ConfigError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
