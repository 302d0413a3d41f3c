"""Peer baseline: TRL's GRPOTrainer on the R1-Zero demo's model and task, timed per rollout step.

One of our rollout steps = prompts x generations samples generated once, then `minibatches` optimizer
updates. In TRL that is `minibatches` consecutive trainer steps (steps_per_generation), the first of
which generates, so each group of `minibatches` steps is timed as one rollout step.

    python tools/trl_peer.py --model-dir HF_DIR --out OUT.json --prompts 16 --generations 8 \
        --max-new-tokens 48 --minibatches 2 --rollouts 3 --threads 1 [--lr 1e-4] \
        [--mode generate|vllm|continuous] [--min-new-tokens N]

Modes: `generate` (TRL's default: batched transformers generate), `vllm` (use_vllm, vllm_mode="colocate"; on
CPU its weight sync goes through vLLM's reload_weights, the only load that works there), `continuous`
(use_transformers_continuous_batching). --min-new-tokens holds back EOS (min_new_tokens / min_tokens) so
completions can be forced to one length. Each step's time is split into generation (the engine call), the
rest of TRL's generate-and-score (rewards, old and reference log-probs) and training.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # startup is measured from here, imports included

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="HF Qwen2 dir (config.json, model.safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--rollouts", type=int, default=3, help="rollout steps; the first is dropped as warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (ours: stage.rl.kl_coef)")
    p.add_argument("--mode", choices=MODES, default="generate", help="how TRL generates (see above)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="EOS held back until this many new tokens")
    return p.parse_args(argv)


MODES = ("generate", "vllm", "continuous")


def _reload_weights_sync(self) -> None:
    """TRL's colocated weight sync through vLLM's reload_weights: its load_weights path fails on CPU
    ('Parameter' object has no attribute 'weight_loader'). The full state is sent (tied heads included)."""
    weights = [(name, p.detach()) for name, p in self._iter_named_params()]
    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    self.llm.reset_prefix_cache()


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (Path(args.model_dir) / "config.json").is_file():
        sys.exit(f"error: {args.model_dir}/config.json not found: --model-dir must be a Hugging Face model directory")
    if args.rollouts < 2:
        sys.exit("error: --rollouts must be >= 2 (the first rollout step is warm-up)")
    if (args.prompts * args.generations) % args.minibatches:
        sys.exit("error: prompts * generations must be divisible by minibatches")

    import torch

    torch.set_num_threads(args.threads)  # before any model work, so no pool is sized for all cores

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.rewards.rules import format_reward
    from rlhf.tasks import addition

    # AutoTokenizer picks Qwen2Tokenizer for a qwen2 config dir and drops the spaces of our
    # character-level tokenizer; load the saved fast tokenizer as what it is.
    tok = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    # The exported config has no special ids; TRL sets pad and adds the tokenizer's eos to generation.
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id

    rows = addition.train_prompts(args.prompts * args.rollouts, seed=0)
    dataset = Dataset.from_list(rows)  # plain-text prompts ending in "<think>", plus the gold "answer"
    completion_lens: list[int] = []  # generated tokens, filled by the reward (called once per generation)

    def accuracy(completions, answer, completion_ids, **_):
        completion_lens.extend(len(ids) for ids in completion_ids)
        return [addition.score(c, a) for c, a in zip(completions, answer)]

    def format_(completions, **_):
        return [format_reward(c, {}) for c in completions]  # our rule, "<think>" + completion

    mode = {
        "generate": {"use_vllm": False},
        "vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": None},
        "continuous": {"use_vllm": False, "use_transformers_continuous_batching": True},
    }[args.mode]
    if args.mode == "vllm":
        from trl.generation.vllm_generation import VLLMGeneration

        VLLMGeneration.sync_weights = _reload_weights_sync
    forced = args.min_new_tokens
    generation_kwargs = (
        ({"min_tokens": forced} if args.mode == "vllm" else {"min_new_tokens": forced}) if forced else None
    )
    config = GRPOConfig(
        output_dir="/tmp/trl_peer_out",  # required; nothing is saved there
        per_device_train_batch_size=args.prompts * args.generations // args.minibatches,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        steps_per_generation=args.minibatches,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=args.beta,
        epsilon=0.2,
        loss_type="grpo",  # ours: seq_mean_token_mean
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        reward_weights=[1.0, 0.5],
        max_steps=args.rollouts * args.minibatches,
        bf16=False,
        use_cpu=True,
        **{k: v for k, v in mode.items() if v is not None},
        generation_kwargs=generation_kwargs,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )

    marks: list[tuple[str, float, float]] = []
    phase_s = {"generation": [], "generate_and_score": []}  # per call, in call order

    def timed(cls, method: str, key: str) -> None:
        inner = getattr(cls, method)

        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return inner(self, *a, **k)
            finally:
                phase_s[key].append(time.perf_counter() - t0)

        setattr(cls, method, wrapper)

    timed(GRPOTrainer, "_generate_single_turn", "generation")
    timed(GRPOTrainer, "_generate_and_score_completions", "generate_and_score")

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append(("begin", time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            marks.append(("end", time.perf_counter(), time.process_time()))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy, format_],
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[Timer()],
    )
    trainer.train()

    samples = args.prompts * args.generations
    begins = [m for m in marks if m[0] == "begin"][:: args.minibatches]
    ends = [m for m in marks if m[0] == "end"][args.minibatches - 1 :: args.minibatches]
    steps = []
    for i, (b, e) in enumerate(zip(begins, ends)):
        lens = completion_lens[i * samples : (i + 1) * samples]
        generation = phase_s["generation"][i] if i < len(phase_s["generation"]) else None
        scored = phase_s["generate_and_score"][i] if i < len(phase_s["generate_and_score"]) else None
        steps.append(
            {
                "wall_s": round(e[1] - b[1], 4),
                "cpu_s": round(e[2] - b[2], 4),
                "samples": samples,
                "tokens": sum(lens),
                "warmup": i == 0,
                # the engine call; the rest of generate-and-score (rewards, old/ref log-probs); the updates
                "generation_s": generation,
                "score_and_logprobs_s": scored - generation if scored is not None and generation is not None else None,
                "train_s": e[1] - b[1] - scored if scored is not None else None,
            }
        )
    timed = steps[1:]
    median_wall = statistics.median(s["wall_s"] for s in timed)
    result = {
        "peer": "trl",
        "mode": args.mode,
        "min_new_tokens": args.min_new_tokens,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "threads": args.threads,
        "prompts": args.prompts,
        "generations": args.generations,
        "max_new_tokens": args.max_new_tokens,
        "minibatches": args.minibatches,
        "steps": steps,
        "median_step_s": round(median_wall, 4),
        "median_cpu_s": round(statistics.median(s["cpu_s"] for s in timed), 4),
        "samples_per_s": round(samples / median_wall, 2),
        "mean_completion_tokens": round(sum(s["tokens"] for s in timed) / (samples * len(timed)), 2),
        "startup_s": round(begins[0][1] - T0, 2),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))


if __name__ == "__main__":
    main()
