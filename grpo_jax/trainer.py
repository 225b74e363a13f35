"""The GRPO training loop: one step, top to bottom, is `GRPOTrainer.train_step`.

    prompts -> template -> sampler (G per prompt) -> verifiers -> advantages
            -> reference log-probs (beta > 0) -> num_iterations x minibatch updates -> metrics

The sampler's log-probabilities are the old policy of the clipped ratio; the reference is a frozen
copy of the starting weights and is never built when beta = 0. Every jitted function takes explicit
pytrees and donates the parameters and optimizer state it replaces.

`TrainerBase` holds what every training stage shares (model, tokenizer, mesh, prompts and held-out
problems, optimizer, verifiers, sampling and evaluation, checkpoints, metrics, the run loop);
`GRPOTrainer` here and `grpo_jax.sft.SFTTrainer` add their data and their step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from ml_collections import ConfigDict

from grpo_jax import data as D
from grpo_jax import hf
from grpo_jax import loss as L
from grpo_jax import model as M
from grpo_jax import objective
from grpo_jax import rewards as R
from grpo_jax import sampler as S
from grpo_jax import sharding
from grpo_jax import test_time as TT
from grpo_jax.logprobs import completion_logprobs
from grpo_jax.metrics import MetricWriter
from grpo_jax.tokenizer import CharTokenizer
from grpo_jax.test_time import pass_at_k  # noqa: F401 - re-exported
from grpo_jax.verifiers import extract_answer, normalize_answer

R1_SYSTEM = ("A conversation between User and Assistant. The Assistant first thinks about the reasoning "
             "process and then gives the answer, enclosed in <think> </think> and <answer> </answer> tags.")


# --------------------------------------------------------------------------------------------------
# Set-up helpers


def loss_config(cfg: ConfigDict) -> L.LossConfig:
    g = cfg.grpo
    return L.LossConfig(
        advantage_estimator=g.advantage_estimator, scale_rewards=g.scale_rewards or None, std_ddof=g.std_ddof,
        clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high or None, dual_clip=g.dual_clip or None,
        beta=g.beta, kl_estimator=g.kl_estimator, aggregation=g.aggregation,
        max_completion_length=g.max_new_tokens, importance_level=g.importance_level,
        mask_truncated=g.mask_truncated, temperature=g.temperature, logprob_chunk=g.logprob_chunk)


def make_optimizer(opt: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up then cosine decay (or constant), global-norm clipping; and its schedule."""
    warmup = max(1, min(opt.warmup_steps, total_steps - 1))
    if opt.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup, max(total_steps, warmup + 1),
                                                end_value=opt.learning_rate * opt.final_lr_fraction)
    elif opt.schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup),
                                   optax.constant_schedule(opt.learning_rate)], [warmup])
    else:
        raise ValueError(f"optimizer.schedule={opt.schedule!r}; expected 'cosine' or 'constant'")
    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm),
                       optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)), lr


def load_model(mcfg: ConfigDict, vocab_size: int, key: jax.Array) -> tuple[M.Params, M.ModelConfig]:
    """Random weights of a named shape (`shape:NAME`, vocab from the tokenizer) or an HF folder/hub id."""
    if mcfg.source.startswith("shape:"):
        base = M.SHAPES[mcfg.source.split(":", 1)[1]]
        # overrides may pad the vocabulary beyond the tokenizer's (Qwen2.5: 151,936 rows for 151,665 tokens)
        fields = {"vocab_size": vocab_size, **dict(mcfg.get("overrides", {}) or {})}
        if fields["vocab_size"] < vocab_size:
            raise ValueError(f"model.overrides.vocab_size={fields['vocab_size']} is smaller than the "
                             f"tokenizer's {vocab_size} tokens")
        cfg = base.replace(dtype=mcfg.dtype, param_dtype=mcfg.param_dtype, remat=mcfg.remat,
                           attention=mcfg.get("attention", "einsum"), **fields)
        return M.init_params(cfg, key), cfg
    from grpo_jax.pretrained import smollm2_path

    path = smollm2_path() if mcfg.source == "smollm2" else mcfg.source
    return hf.load_hf(path, dtype=mcfg.dtype, param_dtype=mcfg.param_dtype, remat=mcfg.remat,
                      attention=mcfg.get("attention", "einsum"))


def load_tokenizer(mcfg: ConfigDict):
    if mcfg.tokenizer == "char":
        return CharTokenizer()
    import transformers

    from grpo_jax.pretrained import qwen2_tokenizer, smollm2_path

    if mcfg.tokenizer == "qwen2":
        return qwen2_tokenizer()
    path = smollm2_path() if mcfg.tokenizer == "smollm2" else mcfg.tokenizer
    declared = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(declared):
        with open(declared) as f:
            cls = json.load(f).get("tokenizer_class")
        # transformers 5's AutoTokenizer swaps a plain tokenizer.json tokenizer (our exported char
        # tokenizer) for the model type's class (e.g. Qwen2Tokenizer), which re-splits the text.
        if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def format_prompt(row: dict, template: str, tokenizer, field: str = "question", instruction: str = "") -> list[int]:
    """Token ids of a row's prompt (`field`, then `instruction` if any): `plain` text, a `chat`
    template, or `r1` (the DeepSeek-R1 system prompt, then chat)."""
    text = str(row[field]) + (f" {instruction}" if instruction else "")
    if template == "plain":
        return tokenizer.encode(text)
    messages = [{"role": "user", "content": text}]
    if template == "r1":
        messages = [{"role": "system", "content": R1_SYSTEM}] + messages
    elif template != "chat":
        raise ValueError(f"data.template={template!r}; expected 'plain', 'chat' or 'r1'")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def all_rows(x: jax.Array) -> np.ndarray:
    """The whole [rows, ...] array on this host (an all-gather when it spans several hosts)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
    """This host's block of rows of a [rows, ...] array whose rows are all hosts' in process order."""
    full = all_rows(x)
    m = len(full) // jax.process_count()
    return full[jax.process_index() * m:(jax.process_index() + 1) * m]


def global_rows(x: np.ndarray, mesh) -> jax.Array:
    """The inverse of local_rows: each host's rows stacked in process order, split over data x fsdp."""
    if jax.process_count() == 1:
        return jnp.asarray(x)
    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(x)), np.asarray(x))


def all_hosts(x: np.ndarray) -> np.ndarray:
    """Every host's values of a per-host array, concatenated in process order (for metrics)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.concatenate(list(multihost_utils.process_allgather(np.asarray(x))))


def all_hosts_json(items: list) -> list:
    """Every host's list of JSON-serialisable items, concatenated in process order."""
    if jax.process_count() == 1:
        return list(items)
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(items).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int64(blob.size))))
    padded = np.zeros(size, np.uint8)
    padded[:blob.size] = blob
    return [x for part in multihost_utils.process_allgather(padded) for x in json.loads(bytes(part).rstrip(b"\0").decode())]


# --------------------------------------------------------------------------------------------------
# Jitted pieces


def apply_if_finite(params, opt_state, grads, loss, tx):
    """One optimizer step, skipped (parameters and state unchanged) when the loss or the gradient
    is not finite, instead of corrupting the parameters. Returns (params, opt_state, grad_norm, ok)."""
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return keep(new_params, params), keep(new_opt, opt_state), gnorm, ok


def _update(params, opt_state, batch, *, model_cfg, loss_cfg, mesh, num_microbatches, tx):
    loss, grads, metrics = objective.loss_and_grad(params, batch, model_cfg, loss_cfg, mesh, num_microbatches)
    params, opt_state, gnorm, ok = apply_if_finite(params, opt_state, grads, loss, tx)
    metrics.update(grad_norm=gnorm, update_skipped=(~ok).astype(jnp.float32))
    return params, opt_state, metrics


@dataclasses.dataclass
class Completions:
    """Sampled completions of a list of problems, the n of each problem adjacent ([rows * n])."""

    texts: list[str]
    lengths: np.ndarray  # [rows * n] tokens, EOS included
    truncated: np.ndarray  # [rows * n] bool: no EOS within the token limit
    mean_logp: np.ndarray  # [rows * n] mean token log-probability under the sampling distribution


@dataclasses.dataclass
class TrainerBase:
    """What every training stage shares: the policy and its tokenizer on a mesh, the prompt rows and
    held-out problems, the optimizer, verifiers, sampling and evaluation, checkpoints, metrics and
    the run loop. Subclasses provide `train_step()` (and `self.data`, a resumable iterator).

    Args:
      cfg: the run's config (configs/base.py lists every field).
      reward_fns: callables by name, used where `cfg.rewards` names them (a reward model, a
        lambda: anything `rewards.score` accepts), on top of `cfg.reward_functions` imports.
      readonly: evaluate, sample or export an existing run without writing into its workdir.
    """

    cfg: ConfigDict
    reward_fns: dict[str, R.RewardFn] | None = None
    readonly: bool = False  # scripts that only read a run: no config.json or metrics written
    name = "train"  # progress bar label

    def __post_init__(self):
        cfg = self.cfg
        self.workdir = cfg.workdir
        os.makedirs(self.workdir, exist_ok=True)
        self.tokenizer = load_tokenizer(cfg.model)
        key = jax.random.key(cfg.seed)
        # Random-weight shapes take their vocabulary size from the tokenizer (HF: added tokens included).
        self.params, self.model_cfg = load_model(cfg.model, len(self.tokenizer), key)
        self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        self.params = sharding.shard_params(self.params, self.model_cfg, self.mesh)
        self.loss_cfg = loss_config(cfg)

        d = cfg.data
        options = {k: d[k] for k in ("digits", "digits_b", "ops") if d.source == "synthetic:arithmetic"}
        load = functools.partial(D.load_rows, d.source, config=d.config or None, n=d.synthetic_size,
                                 required=tuple(d.required_fields), **options)
        self.rows, self.skipped_rows = load(split=d.split, seed=cfg.seed)
        if d.eval_split:  # a separate split (GSM8K's test): a seeded sample of eval_size prompts
            eval_rows, skipped = load(split=d.eval_split, seed=cfg.seed + 1)
            self.skipped_rows += skipped
            self.train_rows = self.rows
            self.eval_rows = eval_rows if d.eval_size >= len(eval_rows) else D.split_rows(eval_rows, d.eval_size, cfg.seed)[1]
        else:
            self.train_rows, self.eval_rows = D.split_rows(self.rows, d.eval_size, cfg.seed, key=d.prompt_field)
        eos = tuple(cfg.sampling.eos_ids) or (self.tokenizer.eos_token_id,)
        self.sampling = S.SamplingConfig(
            max_new_tokens=cfg.grpo.max_new_tokens, temperature=cfg.grpo.temperature, top_k=cfg.sampling.top_k,
            top_p=cfg.sampling.top_p, eos_ids=eos, pad_id=self.tokenizer.pad_token_id,
            prompt_buckets=tuple(cfg.sampling.prompt_buckets))
        self.reward_specs = [R.RewardSpec(n, w) for n, w in cfg.rewards.items()]
        self.reward_fns = {**{k: R.get_reward_fn(v) for k, v in cfg.get("reward_functions", {}).items()},
                           **(self.reward_fns or {})}
        self.pool = R.VerifierPool(cfg.verifier.workers or None, cfg.verifier.timeout_s) if cfg.verifier.workers >= 0 else None

        self.tx, self.lr_schedule = make_optimizer(cfg.optimizer, self.num_updates())
        self.opt_state = sharding.on_mesh(self.tx.init(self.params), self.mesh)
        self.step = 0
        self.rng = jax.random.key_data(jax.random.key(cfg.seed + 1))
        self._logprobs = jax.jit(completion_logprobs, static_argnums=(1, 6, 7))
        self.ckpt = ocp.CheckpointManager(
            os.path.abspath(os.path.join(self.workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True,
                                                 enable_async_checkpointing=False))
        self.writer = MetricWriter(os.path.join(self.workdir, "tb"), enabled=jax.process_index() == 0 and not self.readonly)
        if jax.process_index() == 0 and not self.readonly:  # what this run was, next to its checkpoints
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        self.init_step = self.load_params(cfg.init_from) if cfg.get("init_from") else None

    def num_updates(self) -> int:
        """Optimizer updates in the whole run (the learning-rate schedule's length)."""
        return self.cfg.steps

    def prompt_ids(self, rows: Sequence[dict]) -> list[list[int]]:
        d = self.cfg.data
        return [format_prompt(r, d.template, self.tokenizer, d.prompt_field, d.instruction) for r in rows]

    # ---- sampling and scoring (evaluation, rejection sampling, test-time scaling) ----------------

    def reward_columns(self, rows: Sequence[dict], n: int, lengths: Sequence[int]) -> dict[str, list]:
        """The reward functions' keyword columns: each row's fields repeated n times, plus lengths."""
        columns = {k: [r.get(k) for r in rows for _ in range(n)] for k in rows[0]}
        columns.update(completion_lengths=[int(x) for x in lengths],
                       max_completion_length=[self.cfg.grpo.max_new_tokens] * len(lengths),
                       overlong_buffer=[self.cfg.grpo.overlong_buffer] * len(lengths))
        return columns

    def score(self, specs: Sequence[R.RewardSpec], rows: Sequence[dict], n: int, texts: Sequence[str],
              lengths: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        """rewards.score of `texts` (n per row) with this run's functions and verifier pool."""
        prompts = [str(r[self.cfg.data.prompt_field]) for r in rows for _ in range(n)]
        return R.score(specs, prompts, texts, self.reward_columns(rows, n, lengths), pool=self.pool, fns=self.reward_fns)

    def sample_completions(self, rows: Sequence[dict], n: int, scfg: S.SamplingConfig, key: jax.Array,
                           batch_size: int | None = None) -> Completions:
        """n completions of each of this host's `rows`, `batch_size` problems at a time (on several
        hosts every host calls this with its own block of rows, in step)."""
        batch = batch_size or max(1, self.cfg.eval.batch_size // jax.process_count())
        prompts = self.prompt_ids(rows)
        texts, lengths, truncated, mean_logp = [], [], [], []
        for start in range(0, len(rows), batch):
            r = S.sample(self.params, self.model_cfg, prompts[start:start + batch], n, scfg,
                         jax.random.fold_in(key, start), mesh=self.mesh)
            toks, lens = local_rows(r.tokens), local_rows(r.lengths)
            logp, mask = local_rows(r.logprobs), local_rows(r.mask)
            texts += [self.tokenizer.decode(toks[i, :lens[i]], skip_special_tokens=True) for i in range(len(toks))]
            lengths.append(lens)
            truncated.append(local_rows(r.truncated))
            mean_logp.append((logp * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
        return Completions(texts, np.concatenate(lengths), np.concatenate(truncated), np.concatenate(mean_logp))

    def _host_block(self, rows: Sequence[dict], batch_size: int) -> list[dict]:
        hosts, host = jax.process_count(), jax.process_index()
        if len(rows) % hosts or batch_size % hosts:
            raise ValueError(f"{len(rows)} problems and batch size {batch_size} must split over {hosts} hosts")
        per_host = len(rows) // hosts
        return list(rows[host * per_host:(host + 1) * per_host])

    def evaluate(self, rows: Sequence[dict] | None = None, k: int | None = None) -> dict[str, float]:
        """pass@1 (greedy), and with k samples per problem maj@k and the unbiased pass@k.

        On several hosts each scores its block of the problems; the figures cover all of them."""
        cfg = self.cfg
        k = cfg.eval.k if k is None else k
        rows = self._host_block(self.eval_rows if rows is None else rows, cfg.eval.batch_size)
        spec = [R.RewardSpec(cfg.eval.reward, 1.0)]
        out = {}
        greedy = dataclasses.replace(self.sampling, greedy=True)
        for name, scfg, n in (("greedy", greedy, 1), ("sampled", self.sampling, k)):
            if n == 0:
                continue
            key = jax.random.key(cfg.seed + 7)  # the same draws at every step: differences are the policy's
            gen = self.sample_completions(rows, n, scfg, key)
            scores, _, _ = self.score(spec, rows, n, gen.texts, gen.lengths)
            ok = np.asarray(scores).reshape(len(rows), n) > 0.5
            answers = [normalize_answer(extract_answer(t) or "") for t in gen.texts]
            majority = [TT.majority_correct(answers[i * n:(i + 1) * n], ok[i]) for i in range(len(rows))]
            correct, majority = all_hosts(ok), all_hosts(np.asarray(majority))
            if name == "greedy":
                out["eval/pass@1"] = float(correct.mean())
            else:
                out[f"eval/pass@{k}"] = float(np.mean([pass_at_k(n, int(c.sum()), k) for c in correct]))
                out["eval/mean@1_sampled"] = float(correct.mean())
                out[f"eval/maj@{k}"] = float(majority.mean())
        return out

    # ---- checkpoints -----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """Everything but the parameters that a resumed run needs (subclasses add theirs)."""
        return {"opt_state": self.opt_state, "rng": self.rng, "step": np.asarray(self.step),
                "data": {k: np.asarray(v) for k, v in self.data.state().items()}}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.opt_state, self.rng, self.step = state["opt_state"], state["rng"], int(state["step"])
        self.data.restore({k: int(v) for k, v in state["data"].items()})

    def save(self) -> None:
        # Two items, so that a later stage (or evaluate.py) can read the parameters alone.
        self.ckpt.save(self.step, args=ocp.args.Composite(params=ocp.args.StandardSave(self.params),
                                                          state=ocp.args.StandardSave(self._state())))
        self.ckpt.wait_until_finished()

    def restore(self, step: int | None = None) -> bool:
        """This run's own checkpoint (default: the latest), parameters and training state."""
        step = self.ckpt.latest_step() if step is None else step
        if step is None:
            return False
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": self.params, "state": self._state()})
        out = self.ckpt.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]), state=ocp.args.StandardRestore(target["state"])))
        self.params = out["params"]
        self._set_state(out["state"])
        return True

    def load_params(self, workdir: str, step: int | None = None) -> int:
        """The parameters of another run's checkpoint (default: its latest), e.g. the previous stage
        of a pipeline; the optimizer, step and data position stay this run's. Returns the step."""
        directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
            step = mngr.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {directory} to take the parameters from")
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.params)
            self.params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
        return step

    def export_hf(self, path: str, dtype: str | None = None) -> str:
        """The current policy as a Hugging Face folder (weights, config, tokenizer) for transformers
        and vLLM; the char tokenizer is written as an equivalent `PreTrainedTokenizerFast`."""
        tok = self.tokenizer.to_hf() if isinstance(self.tokenizer, CharTokenizer) else self.tokenizer
        return str(hf.save_hf(jax.device_get(self.params), self.model_cfg, path, dtype=dtype, tokenizer=tok))

    # ---- the run -----------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} does not train; use GRPOTrainer or SFTTrainer")

    def _before_training(self, say) -> None:
        """Work done once, before step 1 of a fresh run (the GRPO trainer's cold start)."""

    def _summary(self, m: dict[str, float]) -> str:
        return f"loss {m.get('loss', float('nan')):.4f}"

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop early at step `until`, saving a checkpoint there)."""
        cfg = self.cfg
        last = cfg.steps if until is None else min(until, cfg.steps)
        lead = jax.process_index() == 0
        # A progress bar on a terminal (host 0); the one-line summaries go to stdout either way.
        bar = tqdm.tqdm(total=cfg.steps, desc=self.name, dynamic_ncols=True,
                        disable=not (lead and sys.stderr.isatty()))

        def say(line: str) -> None:
            if lead:
                tqdm.tqdm.write(line) if not bar.disable else print(line, flush=True)

        if cfg.resume and self.restore():
            say(f"resumed from step {self.step}")
        bar.update(self.step)
        history = []
        if self.step == 0:
            self._before_training(say)
        accuracy = None
        if self.step == 0 and cfg.eval.every and cfg.eval.get("at_start", True):
            ev = self.evaluate()
            self.writer.scalars(ev, 0)
            history.append({"step": 0, **ev})
            accuracy = ev["eval/pass@1"]
            say("step 0 | " + " ".join(f"{k}={v:.3f}" for k, v in ev.items()))
        while self.step < last:
            t0 = time.perf_counter()
            m = self.train_step()
            m["time/step_s"] = time.perf_counter() - t0
            self.writer.scalars(m, self.step)
            record = {"step": self.step, **m}
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                ev = self.evaluate()
                self.writer.scalars(ev, self.step)
                record.update(ev)
                accuracy = ev["eval/pass@1"]
            bar.update(1)
            bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {"loss": f"{m['loss']:.3f}"}),
                            **({} if accuracy is None else {"pass@1": f"{accuracy:.3f}"}))
            if self.step % cfg.log.every == 0 or self.step == last or "eval/pass@1" in record:
                evals = " ".join(f"{k}={v:.3f}" for k, v in record.items() if k.startswith("eval/"))
                say(f"step {self.step}/{cfg.steps} | {self._summary(m)} | " + (f"{evals} | " if evals else "")
                    + f"{m['time/step_s']:.2f}s")
            history.append(record)
            if cfg.checkpoint.every and (self.step % cfg.checkpoint.every == 0 or self.step == last):
                self.save()
        bar.close()
        self.writer.flush()
        return {"history": history}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.ckpt.close()
        self.writer.close()


@dataclasses.dataclass
class GRPOTrainer(TrainerBase):
    """GRPO (DeepSeekMath 2024): `run()` trains, `train_step()` is one step."""

    name = "GRPO"

    def __post_init__(self):
        super().__post_init__()
        cfg = self.cfg
        # The reference model: a frozen copy of the starting weights, only when the KL term is on.
        self.ref_params = jax.tree.map(jnp.copy, self.params) if cfg.grpo.beta > 0 else None
        hosts = jax.process_count()
        if cfg.grpo.prompts_per_step % hosts:
            raise ValueError(f"grpo.prompts_per_step={cfg.grpo.prompts_per_step} (global) does not split over {hosts} hosts")
        self.data = D.PromptIterator(self.train_rows, cfg.grpo.prompts_per_step // hosts, seed=cfg.seed,
                                     host=jax.process_index(), num_hosts=hosts)
        statics = dict(model_cfg=self.model_cfg, loss_cfg=self.loss_cfg, mesh=self.mesh,
                       num_microbatches=cfg.grpo.microbatches, tx=self.tx)
        self._update = jax.jit(functools.partial(_update, **statics), donate_argnums=(0, 1))

    def num_updates(self) -> int:
        return self.cfg.steps * self.cfg.grpo.num_iterations * self.cfg.grpo.minibatches

    # ---- one GRPO step ---------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.grpo.num_generations
        t0 = time.perf_counter()
        rows = self.data.next()
        prompts = self.prompt_ids(rows)
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        rollout = S.sample(self.params, self.model_cfg, prompts, G, self.sampling, key, mesh=self.mesh)
        batch = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                 "completion_ids": rollout.tokens, "completion_mask": rollout.mask,
                 "truncated": rollout.truncated, "old_logp": rollout.logprobs, "sampler_logp": rollout.logprobs}
        if self.ref_params is not None:
            # Dispatched before the host scores the completions: the device computes the reference
            # log-probabilities while the verifiers run, and time/ref_logprobs_s is what is left after.
            batch["ref_logp"], _ = self._logprobs(self.ref_params, self.model_cfg, batch["prompt_ids"],
                                                  batch["prompt_mask"], batch["completion_ids"],
                                                  batch["completion_mask"], self.loss_cfg.temperature,
                                                  self.loss_cfg.logprob_chunk)
        tokens, lengths = local_rows(rollout.tokens), local_rows(rollout.lengths)  # this host's rows
        t_sample = time.perf_counter()

        completions = [self.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True) for i in range(len(tokens))]
        total, per_fn, reward_metrics = self.score(self.reward_specs, rows, G, completions, lengths)
        if reward_metrics.get("rewards/errors") or reward_metrics.get("rewards/timeouts") or reward_metrics.get("rewards/crashes"):
            print(f"step {self.step + 1}: reward functions failed on some completions, scored 0 "
                  f"(errors {reward_metrics['rewards/errors']:.0f}, timeouts {reward_metrics['rewards/timeouts']:.0f}, "
                  f"crashes {reward_metrics['rewards/crashes']:.0f}); last error: {self.pool.last_error}", flush=True)
        t_reward = time.perf_counter()

        # The device runs in order: advantages computed there would wait for the reference pass.
        jax.block_until_ready(batch.get("ref_logp"))
        advantages, adv_metrics = L.compute_advantages(jnp.asarray(total), G, self.loss_cfg)  # groups never span hosts
        batch["advantages"] = global_rows(np.asarray(advantages), self.mesh)
        batch = jax.device_put(batch, {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}) \
            if batch["completion_ids"].shape[0] % (self.mesh.shape["data"] * self.mesh.shape["fsdp"]) == 0 else batch
        t_ref = time.perf_counter()

        n = batch["completion_ids"].shape[0]  # all hosts' completions
        mb = cfg.grpo.minibatches
        if n % mb:
            raise ValueError(f"{n} completions per step do not split into grpo.minibatches={mb}")
        step_metrics = []
        for it in range(cfg.grpo.num_iterations):
            order = np.random.default_rng([cfg.seed, self.step, it]).permutation(n) if mb > 1 else np.arange(n)
            for m in range(mb):
                idx = jnp.asarray(np.sort(order[m * n // mb:(m + 1) * n // mb]))
                part = jax.tree.map(lambda x: x[idx], batch) if mb > 1 else batch
                self.params, self.opt_state, metrics = self._update(self.params, self.opt_state, part)
                step_metrics.append(metrics)
        jax.block_until_ready(self.params)  # updates run asynchronously: time them, not their dispatch
        t_update = time.perf_counter()
        self.step += 1

        out = {k: float(np.mean([float(m[k]) for m in step_metrics])) for k in step_metrics[0]}
        out.update({k: float(v) for k, v in adv_metrics.items()})
        out.update(reward_metrics)
        out["data/skipped_rows"] = float(self.skipped_rows)
        # Advantage and per-function reward metrics are this host's; the headline ones cover all hosts.
        total, lens = all_hosts(total), all_rows(rollout.lengths).astype(np.float64)
        out.update({
            "reward": float(total.mean()), "reward_std": float(total.std()),
            "completion_length/mean": lens.mean(), "completion_length/min": lens.min(),
            "completion_length/max": lens.max(), "frac_truncated": float(all_rows(rollout.truncated).mean()),
            "learning_rate": float(self.lr_schedule(self.step * cfg.grpo.num_iterations * mb)),
            "time/sampling_s": t_sample - t0, "time/rewards_s": t_reward - t_sample,
            "time/ref_logprobs_s": t_ref - t_reward, "time/update_s": t_update - t_ref,
            "completion_tokens_per_s": float(lens.sum() / (t_update - t0)),
        })
        if cfg.log.samples_every and self.step % cfg.log.samples_every == 0:
            self.writer.text("samples", "\n\n".join(
                f"**prompt** {rows[i // G][cfg.data.prompt_field]!r}\n**completion** {completions[i]!r}\n**reward** {total[i]:.3f}"
                for i in range(min(4, len(completions)))), self.step)
        return out

    # ---- cold start (stage 1 of the R1 recipe) ---------------------------------------------------

    def cold_start(self) -> list[float]:
        """Supervised fine-tuning on `sft.completion_format` of the first `sft.examples` training rows
        (R1's small set of demonstrations), so that a policy that has never seen the answer format
        emits it before RL starts: `sft.steps` steps at the constant `sft.learning_rate`. Returns the
        losses. (A separate SFT stage with its own optimizer and checkpoints is `sft.SFTTrainer`.)"""
        from grpo_jax import sft as SFT

        c = self.cfg.sft
        if not c.steps:
            return []
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(c.learning_rate, weight_decay=0.0))
        opt_state = sharding.on_mesh(tx.init(self.params), self.mesh)
        update = jax.jit(functools.partial(SFT.sft_update, model_cfg=self.model_cfg, tx=tx), donate_argnums=(0, 1))
        examples = SFT.demonstrations(self.train_rows, c.completion_format, c.examples)
        it = D.PromptIterator(examples, min(c.batch_size, len(examples)), seed=self.cfg.seed + 11)
        T = self.cfg.grpo.max_new_tokens
        losses = []
        for _ in range(c.steps):
            rows = it.next()
            completions, _ = SFT.encode_completions(self.tokenizer, [r["completion"] for r in rows],
                                                    self.sampling.eos_ids[0], T)
            batch = SFT.make_batch(self.prompt_ids(rows), completions, self.sampling.pad_id,
                                   self.sampling.prompt_buckets, (T,))
            self.params, opt_state, metrics = update(self.params, opt_state, batch)
            losses.append(float(metrics["loss"]))
        if self.ref_params is not None:  # the reference of the RL stage is the cold-started policy
            self.ref_params = jax.tree.map(jnp.copy, self.params)
        return losses

    def _before_training(self, say) -> None:
        if self.cfg.sft.steps:
            t = time.perf_counter()
            losses = self.cold_start()
            say(f"cold start: {self.cfg.sft.steps} SFT steps on {self.cfg.sft.completion_format!r}, loss "
                f"{losses[0]:.3f} -> {losses[-1]:.3f} ({time.perf_counter() - t:.1f} s)")

    def _summary(self, m: dict[str, float]) -> str:
        return (f"reward {m['reward']:.3f} | kl {m.get('kl', 0):.4f} | len {m['completion_length/mean']:.1f}")

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        if self.ref_params is not None:  # the cold-started (or loaded) policy is the reference: keep it
            state["ref_params"] = self.ref_params
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        self.ref_params = state.get("ref_params", self.ref_params)


Trainer = GRPOTrainer  # the name earlier code and notebooks use
