"""Shared defaults of every run; the other configs change a few fields of this one.

Fields that may be unset are `placeholder(TYPE)` (None until given). Renamed fields are listed in
grpo_jax/run/config.py: a config that uses an old name stops with the new one.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.steps = 100
    c.workdir = "runs/default"
    c.resume = False
    c.trainer = "grpo"  # "grpo" or "sft" (grpo_jax.rl.sft: prompt/completion pairs)
    c.init_from = placeholder(str)  # a workdir whose latest checkpoint's parameters start this run (pipelines set it)
    # XLA's persistent compilation cache: a restarted run loads what it compiled before ("": off;
    # $JAX_COMPILATION_CACHE_DIR wins). grpo_jax/run/compilation_cache.py
    c.compilation_cache = "~/.cache/grpo_jax/xla"

    c.model = ConfigDict(dict(
        source="shape:tiny",  # "shape:NAME" (random weights), "smollm2", an HF folder or hub id
        overrides={},  # ModelConfig fields for shape: sources (e.g. num_layers)
        tokenizer="char",  # "char", "qwen2", "smollm2", or an HF folder / hub id
        # Compute and storage dtypes. GPU/TPU: dtype="bfloat16", param_dtype="float32" (float32 master
        # weights, optimizer state and gradient sums; bf16 matmuls). bf16 storage refuses learning
        # rates its weights cannot represent (train_state.check_precision).
        dtype="float32", param_dtype="float32", remat="none",
        residual_dtype=placeholder(str),  # the residual stream (unset: dtype); see architecture.ModelConfig
        attention="einsum",  # cache-free passes: "einsum", "xla" or "cudnn" (see architecture.ModelConfig)
        # LoRA (grpo_jax.models.lora): rank > 0 trains adapters on these projections of a frozen base, stored
        # once in `dtype`, which is also the KL reference (adapters off). 0: a full fine-tune.
        lora=ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,  # dropout: 0 only (see grpo_jax.rollout.policy)
                             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))))

    c.data = ConfigDict(dict(
        source="synthetic:arithmetic", config=placeholder(str), split="train",
        seed=placeholder(int),  # the rows, their split and the held-out sample; unset: the run's seed
        synthetic_size=2000, digits=2, digits_b=placeholder(int), ops="+-*",  # synthetic:arithmetic only
        template="plain",  # "plain", "chat", "r1", or "tokens" (the prompt field holds token ids)
        prompt_field="question", instruction="",  # appended to every prompt, e.g. how to state the answer
        enable_thinking=placeholder(bool),  # chat templates that read it (Qwen3); unset: the template's default
        required_fields=["question", "answer"],
        eval_split=placeholder(str),  # unset: hold eval_size prompts out of `split`; else a seeded sample of it
        eval_size=64))

    # Every setting of the sampler: rollouts, evaluation, rejection sampling. Tuples, so that the
    # command line can set them: --config.sampling.eos_ids='(2,)'.
    c.sampling = ConfigDict(dict(
        max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
        eos_ids=(),  # empty: the tokenizer's EOS token
        prompt_buckets=(16, 32, 64, 128, 256, 512, 1024),
        top_p_candidates=1024,  # top-p without top-k: the nucleus is cut at this many tokens
        # decode's cost: its first segment of steps attends over prompt + first_segment cache slots
        # (each next segment twice as long); finished rows leave the batch once the live ones fit one
        # about shrink_factor times smaller (1: never). Neither changes a completion.
        first_segment=128, shrink_factor=1.5,
        # "inference": sample from a compute-dtype copy of the weights split over mesh.tensor only
        # (made once per rollout, no weight traffic per token); "training": the stored layout.
        weights="inference",
        # LoRA runs: fold the adapters into the rollout copy once per step (faster decoding; the
        # sampler's log-probabilities then differ from the trainer's unmerged ones in bf16) instead of
        # applying them at every projection (exactly the trainer's numerics).
        merge_lora=False))

    c.grpo = ConfigDict(dict(
        prompts_per_step=8, num_generations=8, num_iterations=1, minibatches=1, microbatches=1,
        advantage_estimator="grpo",
        scale_rewards=placeholder(str),  # "group", "batch" or "none"; unset: the estimator's own choice
        std_ddof=0,  # 0: population std (the default here); 1: sample std, as in TRL, verl and Tunix
        clip_eps_low=0.2, clip_eps_high=placeholder(float),  # unset: the same as clip_eps_low
        dual_clip=placeholder(float),  # c > 1 caps negative-advantage losses; unset: off
        beta=0.04, kl_estimator="k3", aggregation="seq-mean-token-mean", importance_level="token",
        mask_truncated=False, overlong_buffer=0, logprob_chunk=1024,
        # The sampler/trainer mismatch (grpo_jax.rl.rollout_correction): None (measured, not corrected),
        # "token_truncate" (TIS), "token_mask", "sequence_truncate" or "sequence_mask" (MIS), with
        # the weights capped to [rollout_correction_min, rollout_correction_max].
        rollout_correction=placeholder(str), rollout_correction_max=2.0, rollout_correction_min=placeholder(float),
        # DAPO's dynamic sampling: keep only groups with signal, sampling about as many more prompts
        # as are missing per round until the batch is full or max_sampling_rounds rounds are done.
        dynamic_sampling=False, max_sampling_rounds=3,
        # the function whose values must differ within a kept group (DAPO: accuracy). Unset: eval.reward;
        # "total": the weighted sum of `rewards`.
        dynamic_sampling_reward=placeholder(str),
        # The update, reference and old-policy passes on packed rows of at most max_row_tokens tokens:
        # each group's prompt computed once, completions without padding (grpo_jax/rl/packing.py).
        # False: every completion in its own row with its prompt, padded to the step's longest.
        packing=True, max_row_tokens=8192,
        router_aux_loss_coef=0.0))  # MoE policies: weight of the routers' load-balancing loss (Qwen3-MoE: 0.001)

    c.rewards = ConfigDict({"math": 1.0})  # reward function name -> weight
    c.reward_functions = ConfigDict()  # your own: name -> "package.module:function" (name it in rewards)
    # workers=-1: score in this process. sandbox: how the `code` reward isolates programs: "auto"
    # (Linux namespaces where available, else limits + audit hook with a warning), "namespaces"
    # (required), "python" (limits + audit hook only). A reward function that times out on
    # hang_after completions of a step with none finished, or that a worker cannot load in
    # load_timeout_s, hangs: with a weight, on_hang="stop" stops the run, "disable" drops it for the
    # rest of the run (said once); with weight 0 (it only logs) it is dropped. A weighted function
    # that fails on every completion of max_failing_steps consecutive steps stops the run.
    c.verifier = ConfigDict(dict(workers=2, timeout_s=10.0, sandbox="auto", hang_after=16, on_hang="stop",
                                 load_timeout_s=120.0, max_failing_steps=3))

    # Supervised fine-tuning: trainer="sft" runs cfg.steps steps with cfg.optimizer on `data`
    # (comma-separated: "demonstrations", "rejection_samples", files or hub datasets; see grpo_jax/rl/sft.py).
    c.sft = ConfigDict(dict(
        data="demonstrations", completion_field="completion", batch_size=32, microbatches=1,
        max_completion_tokens=placeholder(int),  # unset: sampling.max_new_tokens
        completion_format="#### {answer}",
        examples=placeholder(int)))  # demonstrations: the first `examples` training rows (unset: all)

    # Cold start (stage 1 of DeepSeek-R1). With steps > 0 a GRPO run first fine-tunes on
    # demonstrations as an SFT stage of its own, in WORKDIR/cold_start (checkpointed and resumable
    # like any stage), then trains in WORKDIR/grpo (grpo_jax/run/pipeline.py). The fields here override
    # this config for that stage, as a pipeline stage's do.
    c.cold_start = ConfigDict(dict(
        steps=0,
        sft=dict(data="demonstrations"),
        optimizer=dict(learning_rate=1e-3, schedule="constant", warmup_steps=0, b2=0.999, weight_decay=0.0),
        eval=dict(every=0)))

    # Rejection sampling (stage 3 of DeepSeek-R1): n samples per training problem from the starting
    # policy; kept when their weighted reward (`rewards`, {} = the eval verifier) reaches min_reward
    # and they end with EOS; `keep` > 0 keeps the best `keep` per problem; dedupe drops repeated texts.
    c.rejection = ConfigDict(dict(n=16, keep=0, dedupe=True, min_reward=1.0, rewards=ConfigDict(),
                                  max_problems=placeholder(int)))  # unset: every training problem

    c.optimizer = ConfigDict(dict(
        learning_rate=1e-6, warmup_steps=10, schedule="cosine", final_lr_fraction=0.1,
        b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0,
        max_nonfinite_updates=10))  # this many consecutive updates with a NaN/inf loss or gradient stop the run

    # dcn_data > 1: the data axis spans that many TPU slices (multi-slice) or hosts joined by the data
    # centre network; the other axes stay within one (partitioning.make_mesh).
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, dcn_data=1))
    # Before any weight loads, the update, reference and rollout per device from their programs
    # compiled ahead of time (grpo_jax/run/memory_plan.py); a run that does not fit stops with the table
    # and what to change. "auto": where the device reports its memory (GPUs, TPUs); "on", "off".
    c.memory_plan = "auto"
    # asynchronous: orbax writes in the background while training goes on (holding a host copy of
    # the state meanwhile); False: each save blocks until written. Checkpoints are verified on restore:
    # every file's size, and up to verify_gb GB of their blocks (a larger state: the first and last
    # block of each file and random others; scripts/verify_checkpoint.py reads every byte).
    c.checkpoint = ConfigDict(dict(every=50, keep=3, asynchronous=True, verify_gb=8.0))
    c.eval = ConfigDict(dict(every=25, k=4, batch_size=64, reward="math", at_start=True))
    # Tools the policy may call in its rollouts (multi-turn episodes; grpo_jax/rollout/multi_turn.py):
    # built-in names ("calculator", "python") or import paths of functions; () is single-turn. format:
    # how the model writes a call (grpo_jax/rollout/tool_formats.py: plain, qwen, llama3, mistral).
    # sampling.max_new_tokens is the episode's budget of tokens, the model's and the observations'.
    # describe: show the tools' schemas in the prompt (False: a model taught the calls by demonstrations).
    # environment: import path of a tools.Environment subclass (tools with state, one per episode).
    # Budgets: grpo_jax.rollout.multi_turn.Budgets. drop_void_turns: episodes whose last turn has
    # neither a call nor an answer (answer_reward <= 0 on its text) leave the loss (SimpleTIR).
    c.tools = ConfigDict(dict(names=(), environment="", format="plain", max_turns=4, max_calls_per_turn=4,
                              max_observation_tokens=64, call_timeout_s=10.0, episode_tool_s=60.0,
                              resume_after_steps=8, workers=8, describe=True, drop_void_turns=False,
                              answer_reward="answer_format"))
    # A step line every `every` steps; without a progress bar (output not a terminal) also the first
    # step and a line whenever every_s seconds pass without one (0: off).
    c.log = ConfigDict(dict(every=1, every_s=30.0, samples_every=10))
    return c


def lora(c: ConfigDict, learning_rate: float, rank: int = 16, alpha: float = 32.0) -> ConfigDict:
    """`c` as a LoRA run in its own workdir (WORKDIR_lora): adapters of `rank` on every projection of
    the frozen base, at `learning_rate` (LoRA wants ~10x a full fine-tune's rate: Schulman et al.
    2025, "LoRA Without Regret")."""
    c.workdir = c.workdir.rstrip("/") + "_lora"
    c.model.lora.rank, c.model.lora.alpha = rank, alpha
    c.optimizer.learning_rate = learning_rate
    return c
