"""Structured configs behind conf/, and the start-up validation that names the field and the fix.

Hydra composes YAML from conf/; `load_config` merges it onto these dataclasses (unknown keys and wrong
types fail here) and `validate` checks the cross-field rules against the world size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from core.errors import ConfigError
from core.stages import RL_STAGES


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = "qwen2"  # HF architecture for import/export: qwen2 | llama | deepseek_v3
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: Optional[int] = None  # GQA groups (HF num_key_value_heads); None = MHA
    kv_channels: Optional[int] = None  # head dim; None = hidden / heads
    vocab_size: int = MISSING
    vocab_pad_multiple: int = 128  # the padded vocab must not depend on TP, or layouts disagree
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    llama3_rope_scaling: Optional[float] = None  # Llama-3.1's rope scaling factor (8.0)
    norm_epsilon: float = 1e-6
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    # Multi-head latent attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    rope_type: str = "rope"  # rope | yarn
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # Mixture of experts; num_moe_experts None = dense.
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_enable_expert_bias: bool = False  # DeepSeek-V3's aux-loss-free balancing
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0
    first_k_dense_replace: int = 0  # leading dense layers before the MoE ones
    mtp_num_layers: Optional[int] = None  # multi-token prediction depth
    mtp_loss_scaling_factor: float = 0.1

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def is_moe(self) -> bool:
        return bool(self.num_moe_experts)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1
    expert_tensor: Optional[int] = None  # None = same as tensor
    # Uneven pipeline split (megatron's names): layers on the first and last stage, the rest evenly over the
    # middle stages; None = an even split. DeepSeek-V3's 61 layers need it at PP 12 or 16.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    data: Optional[int] = None  # None = whatever the world size leaves
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    recompute: str = "none"  # none | selective | full
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    transformer_impl: str = "auto"  # auto (transformer_engine on GPU, local on CPU) | local | transformer_engine
    fp8: Optional[str] = None  # None | hybrid | e4m3 (Transformer Engine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise

    @property
    def unsharded(self) -> bool:
        """Each rank holds the whole model (data parallelism at most): what in-process decoding and a
        rank-local weight export need."""
        return (self.tensor, self.pipeline, self.context, self.expert) == (1, 1, 1, 1)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8
    global_batch_size: int = 8
    seq_length: int = 64
    dtype: str = "fp32"  # fp32 | bf16
    save_every: int = 0  # 0 = only at the end
    log_every: int = 1
    keep_checkpoints: int = 2
    optim: OptimConfig = field(default_factory=OptimConfig)


TEACHER_ADVANTAGE = "teacher"  # the advantage estimator that reads stage.rl.teacher (rlhf.advantages)


@dataclass
class RLConfig:
    """GRPO as DeepSeekMath/R1 define it by default; each common variant is one switch."""

    prompts_per_step: int = 16  # × rollout.n samples per step
    minibatches: int = 2  # optimizer updates per rollout batch
    advantage: str = "grpo"  # grpo (group z-score) | dr_grpo (no std) | rloo | teacher (rlhf.advantages)
    loss: str = "grpo"  # clipped-ratio policy loss (rlhf.losses.POLICY_LOSSES)
    loss_agg: str = "seq_mean_token_mean"  # | token_mean (DAPO) | seq_mean_token_sum_norm (Dr.GRPO)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2  # > clip_eps_low is DAPO's clip-higher
    kl: str = "k3"  # k1 | k2 | k3 | none
    kl_coef: float = 0.0  # β; R1-Zero uses 0.001. 0 = no reference model, no KL term (train/kl is null)
    ref_refresh_every: int = 0  # copy the policy into the reference every N steps (R1-Zero: 400); 0 = never
    tis_cap: float = 0.0  # truncated importance sampling cap on π_trainer/π_engine; 0 = off
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and refill (DAPO)
    max_refill_rounds: int = 3
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens of max_new_tokens; 0 = off
    overlong_penalty: float = 1.0
    eval_every: int = 0  # held-out pass@1 every N steps; 0 = only at the end
    # On-policy distillation (stage=on_policy_distill, advantage=teacher): the teacher's run dir. Each sampled
    # token's advantage is then teacher log p − own log p (minimising the reverse KL).
    teacher: Optional[str] = None
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops


@dataclass
class SamplingConfig:
    """Rejection sampling (R1 stage 3): which samples of rollout.n per prompt become SFT rows."""

    prompts: int = 0  # prompts to sample from (0 = all of data's train split)
    chunk_prompts: int = 64  # prompts per engine call
    keep_per_prompt: int = 1  # distinct correct, clean samples kept per prompt (0 = all)
    min_language_share: float = 0.99  # reasoning in data.language at least this share (mixed-language filter)
    max_paragraph_chars: int = 2000  # a longer paragraph (blank-line separated) drops the sample
    drop_code_blocks: bool = True  # ``` in the reasoning drops the sample
    # JSONL/Parquet prompt/response rows mixed in (writing, QA, ...), or greet: the tiny greeting task's
    # generated rows, of uneven quality on purpose (rlhf.tasks.general.sft_rows)
    non_reasoning_path: Optional[str] = None
    non_reasoning_share: float = 0.25  # of the final rows (the paper: 200k of 800k)
    # The sampled model writes the reasoning of non-reasoning rows (the paper prompts DeepSeek-V3 for a CoT);
    # such rows' responses are REASONING</think>REST, and the written CoT replaces REASONING
    non_reasoning_cot: bool = False
    cot_min_prompt_chars: int = 40  # shorter prompts are trivial queries ("hello"): no CoT, as in the paper
    cot_max_new_tokens: int = 32
    # Rows whose task has no rule scorer are judged by a generative judge (rlhf.judge): a language model's run dir,
    # prompted with judge_template and answering yes or no. `stage=sft data=judge` trains the tiny one.
    judge: Optional[str] = None
    judge_template: str = "Reference: {reference} Prediction: {prediction} Same? "


@dataclass
class ColdStartConfig:
    """R1 stage 1's data: a previous model's correct, readable outputs in the pattern
    reasoning + reasoning_end + summary (the paper's |special_token|<reasoning_process>|special_token|<summary>)."""

    source: Optional[str] = None  # the model sampled (R1-Zero's run dir); unset: stage.data_from has the rows
    reasoning_end: str = "</think>"  # the token closing the reasoning
    summary: str = "<answer>{answer}</answer>"  # {answer}: the verified answer; {reasoning} also available


@dataclass
class StageConfig:
    name: str = MISSING  # pretrain | sft | r1_zero | ...
    init_from: Optional[str] = None  # run dir or checkpoint dir the stage starts from
    data_from: Optional[str] = None  # a dataset a previous stage wrote (file or its run dir), for sft stages
    epochs: Optional[float] = None  # sft: passes over the data; sets train.steps
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    # reward_model: what the model reads of each response, recorded in its checkpoints so general_rl shows it the
    # same: full | summary (the text after cold_start.reasoning_end; R1 judges helpfulness on the summary only)
    view: str = "full"


@dataclass
class EvalConfig:
    """pass@1 averaged over k samples per held-out prompt, and cons@k (majority answer), as the R1 paper."""

    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: Optional[int] = None  # None: rollout.max_new_tokens
    seed: int = 0


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = "generated"  # generated | jsonl | parquet
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    task: Optional[str] = None  # generator name for source=generated
    num_train: int = 10000
    num_eval: int = 200
    tokenizer: str = "char"  # char (built locally) or a local HF tokenizer dir
    seed: int = 0
    # RL prompts (rlhf.prompts.TEMPLATES): auto = the task's own (addition: its compact one for the 64-token
    # demo model; everything else: r1_zero) | r1_zero | none (file prompts already templated). Checked at load.
    template: str = "auto"
    language: str = "en"  # the reasoning's target language (ISO 639-1) for the language_consistency reward
    # General (non-reasoning) prompts mixed into the RL prompts, scored by reward models (stage=general_rl):
    # greet (the tiny greeting task, rlhf.tasks.general) or None; general_share of all train prompts.
    general_task: Optional[str] = None
    general_share: float = 0.0


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    kv_cache_bytes: int = 256 * 2**20
    colocate: bool = True
    overlong_prompt: str = "error"  # error | truncate: a prompt that leaves no room for max_new_tokens
    timeout_s: float = 600.0  # a generate or weight update running longer is an error, not a hang; 0 = none
    sync_bucket_bytes: int = 64 * 2**20


@dataclass
class RewardModelConfig:
    path: Optional[str] = None  # a reward_model run dir or checkpoint
    weight: float = 1.0


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    # General prompts (no gold answer) get these rule rewards instead, plus each reward model's weighted score.
    general_weights: dict[str, float] = field(default_factory=lambda: {"format": 0.5})
    models: dict[str, RewardModelConfig] = field(default_factory=dict)  # R1 stage 4: helpful, harmless
    timeout_s: float = 5.0
    workers: int = 2


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "r1stack"
    entity: Optional[str] = None


@dataclass
class ClusterConfig:
    name: str = "local"
    launcher: str = "local"  # local (torchrun or a single process) | slurm
    gpus_per_node: int = 0
    nodes: int = 1
    gpu: Optional[str] = None  # h100 | h800 | h20 | h200, for the planner
    gpus: Optional[int] = None  # all GPUs of the job (tools.plan's world size); None = nodes × gpus_per_node


@dataclass
class PlanConfig:
    """What `python -m tools.plan` models beyond the fields above: the measured lengths of a run and the
    engine, offload and schedule choices of a published one. Only the planner reads it."""

    workload: str = "auto"  # auto (stage.name r1_zero -> grpo, else pretrain) | pretrain | grpo
    schedule: str = "1f1b"  # 1f1b | dualpipe (DeepSeek-V3: EP all-to-all under compute, two weight copies)
    prompt_tokens: Optional[int] = None  # mean prompt length; None = seq_length - rollout.max_new_tokens
    response_tokens: Optional[int] = None  # mean response length; None = rollout.max_new_tokens
    micro_batch_tokens: Optional[int] = None  # packed micro-batches of at most this many tokens; None = unpacked
    rollout_tensor: int = 1  # vLLM tensor-parallel size
    rollout_gpus: Optional[int] = None  # GPUs of a separate generation pool (rollout.colocate=false)
    rollout_memory_fraction: float = 0.9  # vLLM gpu_memory_utilization: its weights plus KV cache
    off_policy: int = 0  # 1 = async GRPO: step k+1's generation overlaps step k's training
    optimizer_offload: float = 0.0  # share of the optimizer (fp32 states and the Adam update) on the CPU
    param_offload: bool = False  # training weights and grads wait on the CPU outside their phase


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"
    seed: int = 1234


def load_config(raw: DictConfig | dict[str, Any]) -> Config:
    """Merges composed YAML onto the schema; unknown keys and wrong types become a ConfigError."""
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw)
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    # Untyped first: a node Hydra already typed would let `+new_key` overrides through the merge.
    raw = OmegaConf.create(OmegaConf.to_container(raw, resolve=False))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise explain(e) from None
    return cfg


def explain(error: Exception) -> ConfigError:
    """Turns an OmegaConf/Hydra composition error into one naming the key and the fix."""
    cause = error
    while not isinstance(cause, OmegaConfBaseException) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    key = getattr(cause, "full_key", None) or getattr(cause, "key", None) or "?"
    missing = re.search(r"Could not find '(\w+)/(\w+)'", str(error))
    if missing:
        group, name = missing.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        return ConfigError(f"no preset '{name}' in config group '{group}'. Fix: use one of {options}.")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(
            f"unknown config key '{key}'. Fix: check the spelling against conf/ and core/config.py "
            "(every valid key is a dataclass field there), or remove it."
        )
    if isinstance(cause, ValidationError):
        return ConfigError(f"bad value for config key '{key}': {str(cause).splitlines()[0]}")
    return ConfigError(str(error).splitlines()[0])


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
    if per_update % rl.minibatches or (per_update // rl.minibatches) % t.micro_batch_size:
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
    if r.overlong_prompt not in ("error", "truncate"):
        raise ConfigError(f"rollout.overlong_prompt={r.overlong_prompt!r}: expected error or truncate.")
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


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_schema() -> None:
    """Makes the dataclasses the base of conf/config.yaml, so every field is overridable by name."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=Config)


def model_preset(name: str) -> ModelConfig:
    """conf/model/NAME.yaml alone (a checkpoint records the preset it was trained with)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no model preset {name!r} (conf/model/{name}.yaml). Fix: use one of {options}.")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Config:
    """The config a `python -m ... [overrides]` run would get, outside of @hydra.main (tests, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        try:
            raw = hydra_compose(config_name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as e:
            raise explain(e) from None
    return load_config(raw)
