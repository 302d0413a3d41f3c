# The README's two commands: `make demo` and `make test`. Both set up .venv/ first (a no-op once done).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup test learning demo clean

setup:
	@bash tools/setup_env.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30 -m "not learning" tests

# Learning comparisons (a change against its control run, minutes each): not part of `make test`.
learning: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m learning tests

# The tiny R1-Zero recipe end to end: pretrain a base, GRPO on it, report and held-out summary.
demo: setup
	$(PY) -m rlhf.train stage=pretrain run_dir=runs/demo/pretrain
	$(PY) -m rlhf.train stage=r1_zero stage.init_from=runs/demo/pretrain run_dir=runs/demo/r1_zero
	$(PY) -m tools.report run_dir=runs/demo/r1_zero
	$(PY) -m tools.demo_summary runs/demo

clean:
	rm -rf runs outputs multirun .pytest_cache
