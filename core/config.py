"""The config schema: one dataclass per group of conf/, every field overridable by name.

Hydra composes YAML from conf/; core.compose merges it onto these dataclasses (unknown keys and wrong types
fail there) and core.validate checks the cross-field rules against the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from core.errors import ConfigError
from core.tags import TOOL_TAGS


@dataclass
class ModelConfig:
    name: str = MISSING
    # An HF model directory (config.json, safetensors, tokenizer): `model=hf model.path=DIR` reads the
    # architecture below from DIR/config.json (parallel.hf_arch) and the tokenizer from DIR.
    path: Optional[str] = None
    family: str = "qwen2"  # HF architecture for import/export: qwen2 | qwen3 | llama | deepseek_v3
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
    qk_layernorm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
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
    # The context: prompt + completion. Stages with rollouts derive it from data.max_prompt_tokens +
    # rollout.max_new_tokens when that is set (null here: derived; a smaller explicit value is refused).
    seq_length: Optional[int] = 64
    # RL log-prob passes and updates: micro-batches filled up to this many tokens (rows × the longest row,
    # rows sorted by length) instead of micro_batch_size rows each; 0 = micro_batch_size rows.
    micro_batch_tokens: int = 0
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
    # How that ratio corrects each token (rlhf.losses): tis (truncated at tis_cap) | mis (masked outside
    # [engine_correction_low, tis_cap]) | icepop (weight 1 inside that band, 0 outside)
    engine_correction: str = "tis"
    engine_correction_low: float = 0.5
    # MoE (R3): the policy's forwards route every token to the experts the engine routed it to, as the
    # engine records them (rollout.engine=vllm; parallel.routing_replay). Off, an MoE run with
    # rollout.consistency=topk reports how often the two route alike.
    routing_replay: bool = False
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
    tokenizer: str = "char"  # char (the demo's, built locally) or a local HF tokenizer dir (core.run_tokenizer)
    # File rows' field names and where the gold answer is in its field (rlhf.prompts.gold_answer): plain |
    # gsm8k ("... #### 42": GSM8K's answer) | boxed (the last \boxed{} of a solution: MATH's `solution`).
    # GSM8K: prompt_key=question answer_format=gsm8k; MATH: prompt_key=problem answer_key=solution
    # answer_format=boxed (or answer_key=answer, MATH-500); DeepScaleR / OpenR1-Math: prompt_key=problem.
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    answer_format: str = "plain"
    seed: int = 0
    # RL prompts (rlhf.prompts): chat (the tokenizer's chat template) | r1_zero (the paper's plain template) |
    # compact | none (file prompts already templated) | auto: chat when the tokenizer has a chat template, else
    # the task's own (addition: compact, for the 64-token demo model; everything else: r1_zero).
    template: str = "auto"
    system_prompt: Optional[str] = None  # data.template=chat: a system turn before the question
    think_prefix: bool = True  # data.template=chat: end the prompt with R1's "<think>\n" after the assistant tag
    # The longest prompt a rollout stage takes, in tokens (None: whatever seq_length - max_new_tokens leaves);
    # with it the context is derived: stage.train.seq_length = max_prompt_tokens + rollout.max_new_tokens.
    max_prompt_tokens: Optional[int] = None
    language: str = "en"  # the reasoning's target language (ISO 639-1) for the language_consistency reward
    # General (non-reasoning) prompts mixed into the RL prompts, scored by reward models (stage=general_rl):
    # greet (the tiny greeting task, rlhf.tasks.general) or None; general_share of all train prompts.
    general_task: Optional[str] = None
    general_share: float = 0.0


CONSISTENCY_MODES = ("off", "sampled", "topk")  # rollout.consistency
FULL_VOCAB_TOP_LIMIT = 4096  # rollout.consistency_topk=-1 above this would ship vocab-sized rows per token


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # Stop tokens are masked until a completion has this many tokens: for benchmarks that need equal work
    # on both sides (the engine's log-probs then come from the masked distribution); 0 for training.
    min_new_tokens: int = 0
    kv_cache_bytes: int = 256 * 2**20
    # sync: generate, score, train, then send the weights: every sample comes from the weights it trains.
    # one_step_off: step k+1's rollouts are generated (and scored) while step k trains, on the weights after
    # step k-1, by an engine in its own process. async: that producer runs up to max_staleness steps ahead
    # (one_step_off is async with max_staleness=1). Which weight version generates which step is a function of
    # the step alone (step j: version max(0, j-1-lead)), never of timing, so runs repeat and resume exactly.
    mode: str = "sync"
    max_staleness: int = 1  # async: how many weight versions the oldest trained sample may lag
    # Partial rollouts (one_step_off, async): each step's generation is interrupted after partial_tokens
    # tokens by the next weight update and continues on the new weights, the prefix kept (rlhf.partial).
    partial: bool = False
    partial_tokens: int = 0  # the scheduled interrupt point; 0 = half of max_new_tokens

    @property
    def interrupt_at(self) -> int:
        """Partial rollouts: how many tokens a step's generation samples before the weights change."""
        return self.partial_tokens or self.max_new_tokens // 2

    @property
    def lead(self) -> int:
        """How many steps ahead of the trainer rollouts are generated: each sample's staleness bound."""
        leads = {"sync": 0, "one_step_off": 1, "async": self.max_staleness}
        if self.mode not in leads:
            raise ConfigError(f"rollout.mode={self.mode!r}: expected one of {', '.join(leads)}.")
        if self.max_staleness < 0:
            raise ConfigError(
                f"rollout.max_staleness={self.max_staleness}: a sample cannot come from weights newer than the "
                "trainer's. Fix: 0 or more (1 generates one step ahead, as rollout.mode=one_step_off)."
            )
        return leads[self.mode]

    overlong_prompt: str = "error"  # error | truncate: a prompt that leaves no room for max_new_tokens
    timeout_s: float = 600.0  # a generate or weight update running longer is an error, not a hang; 0 = none
    sync_bucket_bytes: int = 64 * 2**20
    # After each sync (sync mode, one pipeline stage) trainer and engine score a fixed sequence; a larger
    # log-prob gap stops the run (rlhf.refit_probe). The engine runs in fp32: ~1e-6 is usual. 0 = off.
    refit_probe_tol: float = 1e-4
    # The train↔engine mismatch oracle (rlhf.consistency). off: no consistency metrics; sampled: the
    # sampled token's log-prob gap (rollout/logprob_diff_*); topk: also the KL and total variation between
    # the engine's and the trainer's next-token distributions over the engine's consistency_topk most
    # likely tokens and a tail bucket (-1: the whole vocabulary, exact, for small vocabularies only).
    consistency: str = "sampled"
    consistency_topk: int = 20
    consistency_max_kl: float = 0.0  # topk: a step whose worst token's KL exceeds it stops the run; 0 = none

    # Tool-integrated reasoning (rlhf.tool_calls): a completion that closes a call (tool_tags[1]) stops, `tool`
    # runs the call's text in the sandbox, its output (at most tool_output_tokens, between tool_tags[2] and
    # [3]) is appended as tokens the loss masks out, and generation goes on: up to max_tool_calls per sample.
    max_tool_calls: int = 0  # 0: no tool; a tool tag is then an ordinary token
    tool: str = "python"  # rlhf.tool_calls.TOOLS
    tool_timeout_s: float = 3.0  # one call's wall-clock deadline, start-up included
    tool_output_tokens: int = 32
    tool_tags: list[str] = field(default_factory=lambda: list(TOOL_TAGS))

    @property
    def oracle(self) -> bool:
        return self.consistency == "topk"

    @property
    def top_logprobs(self) -> int:
        """What each rollout asks the engine for per token (Sampling.top_logprobs)."""
        return self.consistency_topk if self.oracle else 0


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
    # Where the final answer is (accuracy, format, tools.eval's cons@k): tag = <answer>…</answer> (R1-Zero's
    # template) | boxed = the last \boxed{…} after </think> (R1 and its distilled models)
    answer: str = "tag"
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
    rollout_gpus: Optional[int] = None  # GPUs of the generation pool of an off-policy rollout.mode
    rollout_memory_fraction: float = 0.9  # vLLM gpu_memory_utilization: its weights plus KV cache
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
