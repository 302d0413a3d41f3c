"""Start-up validation: the cross-field rules of a Config against the world size (parallel layout, batch
split, GRPO settings), each failure naming the field and a fix."""

from __future__ import annotations

from core.config import CONSISTENCY_MODES, FULL_VOCAB_TOP_LIMIT, TEACHER_ADVANTAGE, Config, ParallelConfig
from core.errors import ConfigError
from core.stages import RL_STAGES, STAGES


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_layers(num_layers: int, p: ParallelConfig) -> list[int]:
    """Decoder layers per pipeline stage as megatron splits them: the first and last stage as set, the rest
    evenly over the middle stages. Raises ConfigError naming the field and a split that works."""
    pp, first, last = p.pipeline, p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    names = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")
    for name, v in zip(names, (first, last)):
        if v is not None and (v < 1 or pp < 2):
            raise ConfigError(
                f"parallel.{name}={v} needs parallel.pipeline >= 2 and a value >= 1. Fix: set it to null."
            )
    if first is not None and last is not None and pp == 2 and first + last != num_layers:
        raise ConfigError(
            f"parallel.{names[0]}={first} + {names[1]}={last} != model.num_layers={num_layers} at "
            f"parallel.pipeline=2. Fix: make them sum to {num_layers}."
        )
    if first is None and last is None:
        if num_layers % pp:
            raise ConfigError(
                f"model.num_layers={num_layers} is not divisible by parallel.pipeline={pp}. "
                f"Fix: use parallel.pipeline in {_divisors(num_layers)}, or an uneven split: "
                f"{_uneven_hint(num_layers, pp)}."
            )
        return [num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    if middle_stages and (middle < middle_stages or middle % middle_stages):
        raise ConfigError(
            f"model.num_layers={num_layers} minus parallel.{names[0]}={_yaml(first)} and {names[1]}={_yaml(last)} "
            f"leaves {middle} layers for {middle_stages} middle pipeline stages, which does not divide. "
            f"Fix: {_uneven_hint(num_layers, pp)}."
        )
    per = middle // middle_stages if middle_stages else 0
    return ([first] if first is not None else []) + [per] * middle_stages + ([last] if last is not None else [])


def _yaml(v) -> str:
    return "null" if v is None else str(v)


def _uneven_hint(num_layers: int, pp: int) -> str:
    """The most even (first, last) splits that megatron accepts, for an error message."""
    if pp < 3:
        return (
            f"parallel.pipeline=2 with num_layers_in_first_pipeline_stage + num_layers_in_last_pipeline_stage"
            f" = {num_layers}"
        )
    even = num_layers / pp
    pairs = [
        (f, ls)
        for f in range(1, num_layers)
        for ls in range(1, num_layers)
        if num_layers - f - ls >= pp - 2 and (num_layers - f - ls) % (pp - 2) == 0
    ]
    pairs.sort(key=lambda fl: (abs(fl[0] - even) + abs(fl[1] - even), -fl[0]))
    shown = ", ".join(f"({f}, {ls})" for f, ls in pairs[:3])
    return f"set parallel.num_layers_in_first_pipeline_stage/num_layers_in_last_pipeline_stage to one of {shown}"


def validate(cfg: Config, world_size: int) -> Config:
    """Checks the parallel layout against the model and the world size; fills parallel.data."""
    m, p = cfg.model, cfg.parallel
    for name in ("tensor", "pipeline", "context", "expert"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)} must be >= 1")
    tp, pp, cp, ep = p.tensor, p.pipeline, p.context, p.expert
    etp = p.expert_tensor or tp
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor={tp} does not divide model.num_attention_heads={m.num_attention_heads}. "
            f"Fix: use parallel.tensor in {_divisors(m.num_attention_heads)}."
        )
    if not m.multi_latent_attention and m.num_query_groups and m.num_query_groups % tp:
        raise ConfigError(
            f"parallel.tensor={tp} does not divide model.num_query_groups={m.num_query_groups} (KV heads). "
            f"Fix: use parallel.tensor in {_divisors(m.num_query_groups)}."
        )
    if m.padded_vocab_size % tp:
        raise ConfigError(
            f"parallel.tensor={tp} does not divide the padded vocabulary {m.padded_vocab_size}. "
            "Fix: set model.vocab_pad_multiple to a multiple of parallel.tensor."
        )
    pipeline_layers(m.num_layers, p)
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of tensor×pipeline×context = {tp}×{pp}×{cp}. "
            f"Fix: launch a multiple of {tp * pp * cp} processes, or change parallel.*."
        )
    dp = world_size // (tp * pp * cp)
    if p.data is not None and p.data != dp:
        raise ConfigError(
            f"world size {world_size} ≠ tensor×pipeline×context×data = {tp}×{pp}×{cp}×{p.data}. "
            f"Fix: launch {tp * pp * cp * p.data} processes, or set parallel.data={dp} (or null)."
        )
    if m.is_moe:
        if m.num_moe_experts % ep:
            raise ConfigError(
                f"parallel.expert={ep} does not divide model.num_moe_experts={m.num_moe_experts}. "
                f"Fix: use parallel.expert in {_divisors(m.num_moe_experts)}."
            )
        if (world_size // pp) % (ep * etp):
            raise ConfigError(
                f"expert×expert_tensor = {ep}×{etp} does not divide the {world_size // pp} ranks of a "
                "pipeline stage. Fix: pick parallel.expert (and expert_tensor) dividing world/pipeline."
            )
        groups = m.moe_router_num_groups
        if m.family == "deepseek_v3" and groups and m.moe_router_topk // (m.moe_router_group_topk or 1) != 2:
            raise ConfigError(
                f"model.moe_router_topk={m.moe_router_topk} // moe_router_group_topk={m.moe_router_group_topk} "
                "must be 2: megatron scores an expert group by its top (topk // group_topk) experts, "
                "DeepSeek-V3 (HF, vLLM) by its top 2, so the exported model would route differently. "
                "Fix: set moe_router_topk = 2 × moe_router_group_topk."
            )
        if tp > 1 and not p.sequence_parallel:
            raise ConfigError(
                "MoE with parallel.tensor > 1 needs sequence parallelism (megatron-core rejects it "
                "otherwise). Fix: set parallel.sequence_parallel=true."
            )
    elif ep > 1:
        raise ConfigError(f"parallel.expert={ep} but model '{m.name}' has no experts. Fix: set parallel.expert=1.")
    if m.multi_latent_attention and tp > 1 and not p.sequence_parallel:
        raise ConfigError(
            "MLA with parallel.tensor > 1 needs sequence parallelism: the shared rope key's grad is "
            "summed over TP by the sequence-parallel gather. Fix: set parallel.sequence_parallel=true."
        )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1. Fix: set it false.")
    if p.recompute not in ("none", "selective", "full"):
        raise ConfigError(f"parallel.recompute={p.recompute!r}: expected none, selective or full.")
    _context_length(cfg)
    t = cfg.stage.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"stage.train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size×data = {t.micro_batch_size}×{dp}. Fix: adjust either batch size."
        )
    if cfg.stage.view not in ("full", "summary"):
        raise ConfigError(f"stage.view={cfg.stage.view!r}: expected full or summary.")
    if cfg.stage.name in RL_STAGES:
        _validate_rl(cfg, dp)
    p.data = dp
    return cfg


def _context_length(cfg: Config) -> None:
    """Rollout stages: stage.train.seq_length (also the engine's max_model_len) from data.max_prompt_tokens +
    rollout.max_new_tokens, so a 32k-token response budget is one setting; an explicit smaller one is refused."""
    t, d, r = cfg.stage.train, cfg.data, cfg.rollout
    rollouts = STAGES.get(cfg.stage.name).loop in ("grpo", "sampling")
    if rollouts and d.max_prompt_tokens is not None:
        if d.max_prompt_tokens < 1:
            raise ConfigError(f"data.max_prompt_tokens={d.max_prompt_tokens}. Fix: a positive token count, or null.")
        need = d.max_prompt_tokens + r.max_new_tokens
        if t.seq_length is None:
            t.seq_length = need
        elif t.seq_length < need:
            raise ConfigError(
                f"stage.train.seq_length={t.seq_length} < data.max_prompt_tokens + rollout.max_new_tokens = "
                f"{d.max_prompt_tokens} + {r.max_new_tokens} = {need}. Fix: set stage.train.seq_length=null "
                f"(derived) or >= {need}."
            )
    if rollouts and r.temperature == 0 and r.n > 1:
        raise ConfigError(
            f"rollout.temperature=0 (greedy) with rollout.n={r.n}: every sample of a prompt would be the same, "
            "and vLLM refuses it. Fix: rollout.n=1 for greedy decoding, or a temperature above 0."
        )
    if t.seq_length is None:
        raise ConfigError(
            f"stage.train.seq_length=null (stage={cfg.stage.name}) is derived only for rollout stages with "
            "data.max_prompt_tokens set. Fix: set stage.train.seq_length, or data.max_prompt_tokens."
        )
    if t.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"stage.train.seq_length={t.seq_length} > model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}. Fix: shorten the prompts or responses, or use a model with a "
            "longer context."
        )


def _validate_rl(cfg: Config, dp: int) -> None:
    rl, r, t = cfg.stage.rl, cfg.rollout, cfg.stage.train
    if r.n < 2:
        raise ConfigError(f"rollout.n={r.n}: GRPO compares samples within a group. Fix: rollout.n >= 2.")
    if rl.prompts_per_step % dp:
        raise ConfigError(
            f"stage.rl.prompts_per_step={rl.prompts_per_step} does not split over {dp} data-parallel "
            "ranks (groups never span ranks). Fix: make it a multiple of parallel.data."
        )
    per_update = rl.prompts_per_step // dp * r.n
    whole_micro = t.micro_batch_tokens or (per_update // max(rl.minibatches, 1)) % t.micro_batch_size == 0
    if per_update % rl.minibatches or not whole_micro:
        raise ConfigError(
            f"each rank's {per_update} samples per step (prompts_per_step/data × rollout.n) must split "
            f"into stage.rl.minibatches={rl.minibatches} updates of whole micro-batches of "
            f"stage.train.micro_batch_size={t.micro_batch_size}. Fix: adjust one of them."
        )
    if r.max_new_tokens >= t.seq_length:
        raise ConfigError(
            f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in "
            f"stage.train.seq_length={t.seq_length}. Fix: lower it or raise seq_length."
        )
    if rl.clip_eps_low < 0 or rl.clip_eps_high < 0 or rl.clip_eps_low >= 1:
        raise ConfigError("stage.rl.clip_eps_low must be in [0, 1) and clip_eps_high >= 0.")
    if rl.tis_cap > 0 and rl.engine_correction != "tis" and not 0 <= rl.engine_correction_low < rl.tis_cap:
        raise ConfigError(
            f"stage.rl.engine_correction_low={rl.engine_correction_low} with stage.rl.tis_cap={rl.tis_cap}: "
            f"{rl.engine_correction} keeps the tokens whose ratio π_old/π_engine lies in [low, cap], which is "
            "empty. Fix: a low below the cap (e.g. 0.5 with cap 2)."
        )
    if t.micro_batch_tokens and t.micro_batch_tokens < t.seq_length:
        raise ConfigError(
            f"stage.train.micro_batch_tokens={t.micro_batch_tokens} < stage.train.seq_length={t.seq_length}: "
            "a full-length row would not fit one micro-batch. Fix: raise it to at least seq_length (or 0: "
            "micro_batch_size rows per micro-batch)."
        )
    if not 0 <= r.min_new_tokens <= r.max_new_tokens:
        raise ConfigError(
            f"rollout.min_new_tokens={r.min_new_tokens} must be in [0, rollout.max_new_tokens={r.max_new_tokens}]. "
            "Fix: lower it (0 lets completions stop whenever the model ends them)."
        )
    if r.overlong_prompt not in ("error", "truncate"):
        raise ConfigError(f"rollout.overlong_prompt={r.overlong_prompt!r}: expected error or truncate.")
    if r.lead or r.mode != "sync":
        _validate_off_policy(cfg, dp)
    if r.partial:
        _validate_partial(r)
    _validate_consistency(r, cfg.model.vocab_size)
    if rl.routing_replay:
        _validate_routing_replay(cfg)
    if (rl.advantage == TEACHER_ADVANTAGE) != bool(rl.teacher):
        raise ConfigError(
            f"stage.rl.teacher={rl.teacher} with stage.rl.advantage={rl.advantage} (stage={cfg.stage.name}): "
            f"a teacher is what stage.rl.advantage={TEACHER_ADVANTAGE} (stage=on_policy_distill) learns from, "
            "and only it. Fix: set stage.rl.teacher=TEACHER_RUN there, and unset it elsewhere."
        )
    d = cfg.data
    if bool(d.general_task) != (d.general_share > 0) or not 0 <= d.general_share < 1:
        raise ConfigError(
            f"data.general_task={d.general_task} with data.general_share={d.general_share}: general "
            "prompts need both, a task and a share in (0, 1). Fix: set both, or neither."
        )
    for name, m in cfg.reward.models.items():
        if not m.path:
            raise ConfigError(
                f"reward.models.{name}.path is unset. Fix: set it to a stage=reward_model run dir, "
                f"or drop the model (~reward.models.{name})."
            )
    if d.general_task and not cfg.reward.models:
        raise ConfigError(
            f"data.general_task={d.general_task} mixes in prompts no rule can score, and reward.models "
            "is empty. Fix: set reward.models.helpful.path=RUN_DIR (a stage=reward_model run), and "
            "others as needed."
        )


def _validate_consistency(r, vocab_size: int) -> None:
    """The mismatch oracle (rlhf.consistency): a known mode, a top-k the engine can return, a bound it measures."""
    if r.consistency not in CONSISTENCY_MODES:
        raise ConfigError(f"rollout.consistency={r.consistency!r}: expected one of {', '.join(CONSISTENCY_MODES)}.")
    if r.consistency_topk == 0 or r.consistency_topk < -1:
        raise ConfigError(
            f"rollout.consistency_topk={r.consistency_topk}: how many of the engine's most likely tokens the "
            "oracle compares per position. Fix: a positive count (20 is usual), or -1 for the whole vocabulary."
        )
    if r.oracle and r.consistency_topk == -1 and vocab_size > FULL_VOCAB_TOP_LIMIT:
        raise ConfigError(
            f"rollout.consistency_topk=-1 asks the engine for all {vocab_size} log-probs of every token: "
            f"{vocab_size} values per generated token cross to the trainer. Fix: a top-k (e.g. 20; the "
            f"rest of the mass is one tail bucket); -1 is for vocabularies of at most {FULL_VOCAB_TOP_LIMIT}."
        )
    if r.consistency_max_kl < 0 or (r.consistency_max_kl > 0 and not r.oracle):
        raise ConfigError(
            f"rollout.consistency_max_kl={r.consistency_max_kl} with rollout.consistency={r.consistency}: the "
            "bound applies to the KL that rollout.consistency=topk measures. Fix: set that, or the bound to 0."
        )


def _validate_routing_replay(cfg: Config) -> None:
    """R3 (parallel.routing_replay): an MoE policy, an engine that records its routing, one pipeline stage."""
    m, r, p = cfg.model, cfg.rollout, cfg.parallel
    if not m.is_moe:
        raise ConfigError(
            f"stage.rl.routing_replay=true with model={m.name}, which has no MoE layers: there is no routing "
            "to replay. Fix: stage.rl.routing_replay=false."
        )
    if r.engine != "vllm":
        raise ConfigError(
            f"stage.rl.routing_replay=true with rollout.engine={r.engine}: only the vllm engine records the "
            "experts it routes each token to. Fix: rollout.engine=vllm."
        )
    if p.pipeline > 1:
        raise ConfigError(
            f"stage.rl.routing_replay=true with parallel.pipeline={p.pipeline}: replaying routes under a "
            "pipeline schedule (several micro-batches in flight, recomputed in the backward) is not built. "
            "Fix: parallel.pipeline=1 (tensor and expert parallelism replay), or routing_replay=false."
        )


def _validate_partial(r) -> None:
    """Partial rollouts: a weight update interrupts a step's generation, which needs one to come mid-way."""
    if r.mode == "sync" or r.lead == 0:
        raise ConfigError(
            f"rollout.partial=true with rollout.mode={r.mode} (lead {r.lead}): partial rollouts continue a "
            "generation on the weights that arrive while it runs, and this mode sends none then. Fix: "
            "rollout.mode=one_step_off or async, or rollout.partial=false."
        )
    if not 0 < r.interrupt_at < r.max_new_tokens:
        raise ConfigError(
            f"rollout.partial_tokens={r.partial_tokens} with rollout.max_new_tokens={r.max_new_tokens}: the "
            "interrupt must fall inside a completion. Fix: a value in [1, max_new_tokens), or 0 for half."
        )


def _validate_off_policy(cfg: Config, dp: int) -> None:
    """An off-policy rollout.mode: each replica's engine runs in a process of its own beside the trainer."""
    r, p = cfg.rollout, cfg.parallel
    if r.engine != "vllm":
        raise ConfigError(
            f"rollout.mode={r.mode} with rollout.engine={r.engine}: overlapped generation runs the engine in a "
            "process of its own, which only the vllm engine has. Fix: rollout.engine=vllm, or rollout.mode=sync."
        )
    if cfg.stage.rl.tis_cap <= 0:
        raise ConfigError(
            f"rollout.mode={r.mode} trains on samples from older weights, and stage.rl.tis_cap=0 leaves that "
            "uncorrected. Fix: set stage.rl.tis_cap (e.g. 2: each token weighted by min(π_old/π_engine, 2))."
        )
    # Several trainer processes: each replica's engine rank runs its producer thread alone (rlhf.producer),
    # so nothing there may need the other ranks.
    if p.context > 1:
        raise ConfigError(
            f"rollout.mode={r.mode} with parallel.context={p.context}: the overlapped producer runs one engine per "
            "model replica, and context-parallel ranks would each run one. Fix: rollout.mode=sync, or context=1."
        )
    if dp > 1 and cfg.stage.rl.dynamic_sampling:
        raise ConfigError(
            f"rollout.mode={r.mode} with stage.rl.dynamic_sampling=true and {dp} data-parallel replicas: each "
            "replica's producer would decide its refills alone, and the replicas' prompt streams would part. "
            "Fix: stage.rl.dynamic_sampling=false, parallel.data=1, or rollout.mode=sync."
        )
    if p.tensor * p.pipeline > 1 and cfg.reward.models:
        raise ConfigError(
            f"rollout.mode={r.mode} with reward.models and parallel.tensor={p.tensor}, pipeline={p.pipeline}: "
            "the producer scores rollouts on the engine rank alone, and a sharded reward model needs every rank "
            "of the replica. Fix: tensor=pipeline=1, or rollout.mode=sync."
        )
