"""A training run: the loop around one algorithm's step.

    with Trainer(cfg) as trainer:     # cfg.trainer: "grpo" (grpo_jax.rl.grpo) or "sft" (grpo_jax.rl.sft)
        trainer.run()                 # steps, held-out evaluation, checkpoints, TensorBoard, progress

The trainer composes the pieces and holds no algorithm of its own:

    policy      grpo_jax.rollout.policy.Policy: tokenizer, mesh, prompt format, sampling (the parameters are the state's)
    task        grpo_jax.common.data.Task: training and held-out rows
    scorer      grpo_jax.rewards.scoring.Scorer: reward functions and the verifier pool (started on first use)
    algorithm   grpo.GRPO or sft.SFT: state, clock -> state, metrics
    state       grpo_jax.rl.train_state.TrainState: what a checkpoint holds
    checkpoints grpo_jax.run.checkpoint.Checkpoints; writer: grpo_jax.common.metrics.MetricWriter
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import tqdm
from ml_collections import ConfigDict

from grpo_jax.common import data
from grpo_jax.common import metrics
from grpo_jax.common import storage
from grpo_jax.models import lora
from grpo_jax.parallel import multihost
from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.rl import sft
from grpo_jax.rl import train_state
from grpo_jax.rollout import evaluation
from grpo_jax.rollout import policy
from grpo_jax.rollout import sampler
from grpo_jax.run import checkpoint
from grpo_jax.run import config
from grpo_jax.run import graceful_stop
from grpo_jax.run import loading
from grpo_jax.run import memory_plan
from grpo_jax.run import workdir_lock

ALGORITHMS = {"grpo": grpo.GRPO, "sft": sft.SFT}


class Trainer:
    """One run of `cfg` in `cfg.workdir` (configs/base.py lists every field).

    Args:
      cfg: the run's config.
      reward_fns: callables by name, used where `cfg.rewards` names them (a reward model, a lambda:
        anything `scoring.score` accepts), on top of `cfg.reward_functions` imports.
    """

    def __init__(self, cfg: ConfigDict, reward_fns: dict[str, scoring.RewardFn] | None = None):
        config.check(cfg)
        config.check_mesh(cfg, jax.device_count(), jax.process_count())
        if cfg.cold_start.steps:
            raise ValueError(f"cold_start.steps={cfg.cold_start.steps}: the cold start is a stage of its own; run the "
                             "config with grpo_jax.run.pipeline.run(cfg) (scripts/train.py does): cold_start, then grpo")
        self.cfg = cfg
        self.workdir = str(storage.path(cfg.workdir))  # local or an object store (gs://...)
        storage.path(self.workdir).mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # loading a model and compiling take a while: say what is going on
            print(f"{cfg.trainer} run in {self.workdir}: loading {cfg.init_from or cfg.model.source}", flush=True)
        # Before any work: a second run into this workdir would overwrite this one's checkpoints.
        self._lock = workdir_lock.WorkdirLock(self.workdir).acquire() if jax.process_index() == 0 else None
        task = data.load_task(cfg.data, cfg.seed)  # a data file the run cannot use stops it before the model loads
        pol, self.source = loading.load(cfg, before_weights=lambda *a: self._plan_memory(task, *a))
        # LoRA: the optimizer, gradients and checkpoints see the adapters only; the base stays frozen.
        frozen, trained = lora.split(pol.params) if pol.model_cfg.lora_rank else (None, pol.params)
        train_state.check_precision(trained, cfg.optimizer.learning_rate)
        self.policy = pol.replace(params=None)  # the state's parameters are the policy's
        # Measured now: a prompt that cannot be sampled would stop the run when drawn (and on resume).
        self.task, dropped = data.without_long_prompts(task, self.policy.too_long, max(self.policy.sampling.prompt_buckets))
        if dropped and jax.process_index() == 0:
            print(dropped, flush=True)
        self.scorer = scoring.Scorer.from_config(cfg, reward_fns)
        self.algorithm = ALGORITHMS[cfg.trainer].from_config(cfg, self.policy, self.scorer, self.task)
        ref_params = self.algorithm.reference_params(pol.params)
        self.state = train_state.create(trained, self.algorithm.tx, self.policy.mesh, seed=cfg.seed + 1,
                                        data=self.algorithm.initial_data(), frozen=frozen, ref_params=ref_params)
        # Recorded in each checkpoint, not stored: both are rebuilt from their source by every run.
        base = None if frozen is None else {"source": self.source, "fingerprint": lora.fingerprint(frozen)}
        reference = None if ref_params is None else {"source": self.source, "fingerprint": lora.fingerprint(ref_params)}
        lead = jax.process_index() == 0
        self.checkpoints = checkpoint.Checkpoints(self.workdir, cfg.checkpoint.keep, base=base, reference=reference,
                                                  asynchronous=cfg.checkpoint.asynchronous,
                                                  verify_bytes=cfg.checkpoint.verify_gb * 1e9,
                                                  say=print if lead else lambda line: None)
        self.writer = metrics.MetricWriter(f"{self.workdir}/tb", enabled=lead)
        if lead:  # what this run was, next to its checkpoints
            storage.write_text(f"{self.workdir}/config.json", config.to_json(cfg))

    def _plan_memory(self, task: data.Task, model_cfg, mesh, tokenizer) -> None:
        """The run's memory per device before any weight loads (grpo_jax.run.memory_plan; cfg.memory_plan),
        for prompts as long as the task's longest (the 16 longest texts tokenised, then bucketed)."""
        cfg, d = self.cfg, self.cfg.data
        if not memory_plan.wanted(cfg):
            return
        fmt = policy.PromptFormat(d.template, d.prompt_field, d.instruction, d.get("enable_thinking"))
        longest = sorted(task.train, key=lambda r: len(str(r.get(d.prompt_field, ""))))[-16:]
        n = max((len(fmt.ids(r, tokenizer)) for r in longest), default=1)
        buckets = tuple(cfg.sampling.prompt_buckets)
        memory_plan.plan_run(cfg, model_cfg, mesh, prompt_len=sampler.bucket_length(min(n, max(buckets)), buckets))

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(quiet=kind is not None)

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def params(self):
        """The policy's parameters (a LoRA run's: its adapters on the frozen base)."""
        return train_state.policy_params(self.state)

    def current_policy(self) -> policy.Policy:
        return self.policy.replace(params=self.params)

    def evaluate(self, rows=None, k: int | None = None) -> dict[str, float]:
        """Held-out figures of the current policy (grpo_jax.rollout.evaluation)."""
        options = evaluation.settings(self.cfg)
        if k is not None:
            options["k"] = k
        return evaluation.evaluate(self.current_policy(), self.task.eval if rows is None else rows, self.scorer,
                                   **options)

    def train_step(self) -> dict[str, Any]:
        """One step of the algorithm, timed: its metrics plus time/*_s and throughput."""
        clock = metrics.Stopwatch()
        self.state, m = self.algorithm.step(self.state, clock)
        m.update(clock.laps)
        m["time/step_s"] = clock.total()
        if "completion_tokens" in m:
            m["completion_tokens_per_s"] = m["completion_tokens"] / m["time/step_s"]
        return m

    def save(self) -> None:
        self.checkpoints.save(self.state)

    def restore(self) -> bool:
        """This run's latest checkpoint, if it has one."""
        state = self.checkpoints.restore(self.state)
        if state is None:
            return False
        self.state = state
        return True

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop early at step `until`, saving a checkpoint there). SIGTERM or
        SIGINT stops it after the current step with a checkpoint (SystemExit(128 + signal))."""
        with graceful_stop.GracefulStop() as stop:
            return self._run(until, stop)

    def _run(self, until: int | None, stop: graceful_stop.GracefulStop) -> dict[str, Any]:
        cfg = self.cfg
        last = cfg.steps if until is None else min(until, cfg.steps)
        lead = jax.process_index() == 0
        # A progress bar on a terminal (host 0); the one-line summaries go to stdout either way.
        bar = tqdm.tqdm(total=cfg.steps, desc=self.algorithm.name, dynamic_ncols=True,
                        disable=not (lead and sys.stderr.isatty()))

        def say(line: str) -> None:
            if lead:
                tqdm.tqdm.write(line) if not bar.disable else print(line, flush=True)

        if cfg.resume:
            say(f"resumed from step {self.step}" if self.restore() else
                f"no checkpoint in {checkpoint.directory(self.workdir)} yet: starting from step 0")
        bar.update(self.step)
        first, last_said = self.step + 1, time.monotonic()
        history = []
        if self.step == 0:
            self.algorithm.before_training(self.state, say)
        accuracy = None
        if self.step == 0 and cfg.eval.every and cfg.eval.at_start:
            ev = self.evaluate()
            self.writer.write(ev, 0)
            history.append({"step": 0, **ev})
            accuracy = ev["eval/pass@1"]
            say("step 0 | " + " ".join(f"{k}={v:.3f}" for k, v in ev.items()))
        stopping = 0  # the signal every host has agreed to stop for (see _agree), 0 while none
        while self.step < last and not stopping:
            m = self.train_step()
            step = self.step
            self._report_reward_failures(step)
            self.writer.write(m, step)
            record = {"step": step, **{k: v for k, v in m.items() if not isinstance(v, str)}}
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.steps):
                ev = self.evaluate()
                self.writer.write(ev, step)
                record.update(ev)
                accuracy = ev["eval/pass@1"]
            bar.update(1)
            bar.set_postfix(**({"reward": f"{m['reward']:.3f}"} if "reward" in m else {"loss": f"{m['loss']:.3f}"}),
                            **({} if accuracy is None else {"pass@1": f"{accuracy:.3f}"}))
            # Every log.every steps, and without a progress bar also the first step of the session
            # (it includes compiling) and whenever log.every_s seconds have passed without a line.
            quiet_for = time.monotonic() - last_said
            if (step % cfg.log.every == 0 or step == last or "eval/pass@1" in record
                    or (bar.disable and (step == first or 0 < cfg.log.get("every_s", 0) <= quiet_for))):
                evals = " ".join(f"{k}={v:.3f}" for k, v in record.items() if k.startswith("eval/"))
                say(f"step {step}/{cfg.steps} | {self.algorithm.summary(m)} | " + (f"{evals} | " if evals else "")
                    + f"{m['time/step_s']:.2f}s")
                last_said = time.monotonic()
            history.append(record)
            if self._lock is not None:
                self._lock.refresh()  # an object store's lease; nothing on a local disk
            stopping = self._agree(stop)
            if step == last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):  # every=0: at the end
                self.save()
        bar.close()
        if stopping:
            stop.signum = stop.signum or stopping  # a host that got no signal stops for another's
            if self.step and self.checkpoints.latest_step() != self.step:
                self.save()
            self.checkpoints.wait()  # written before the message says so (a second signal still stops it)
            self.writer.flush()
            say(f"stopped by {stop.name} at step {self.step}/{cfg.steps}" + (
                f": checkpoint saved in {checkpoint.directory(self.workdir)}; run the same command"
                + ("" if cfg.resume else " with --config.resume=True") + " to continue"
                if self.step else " (nothing trained yet)"))
            raise SystemExit(stop.exit_code)
        self.writer.flush()
        return {"history": history}

    def _agree(self, stop: graceful_stop.GracefulStop) -> int:
        """What every host does after this step, decided together: a signal any host received stops
        them all (returned: the signal's number, else 0), and a background save that failed on any
        host stops them all now (raised), not at the next save. One small all-gather per step with
        several hosts; one host reads its own flags. A host deciding alone would save while the
        others sample: different collectives, a hang, and no checkpoint."""
        failure = self.checkpoints.poll()
        signum, failed = multihost.host_max([stop.signum or 0, failure is not None])
        if failed:
            raise failure or checkpoint.CheckpointError(
                f"a checkpoint save failed on another host at step {self.step} (its output says why): every host "
                "stops; the earlier checkpoints are intact")
        return signum

    def _report_reward_failures(self, step: int) -> None:
        for name, f in self.scorer.take_failures().items():
            print(f"step {step}: reward {name!r} failed on {f['errors'] + f['timeouts'] + f['crashes']} of {f['items']} "
                  f"completions, scored 0 (errors {f['errors']}, timeouts {f['timeouts']}, crashes {f['crashes']})"
                  + (f"; last error: {f['last_error']}" if f.get("last_error") else ""), flush=True)

    def close(self, quiet: bool = False) -> None:
        """Wait for the checkpoint in flight (raising if it could not be written, unless `quiet`:
        another error is being raised), then release the verifier pool, the event file and the
        workdir lock whatever happened."""
        try:
            self.checkpoints.close(quiet)
        finally:
            self.scorer.close()
            self.writer.close()
            if self._lock is not None:
                self._lock.release()
