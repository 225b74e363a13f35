"""The training loop end to end on a tiny model: metrics, checkpoints, evaluation, resume, overrides."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_DIRS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import base  # noqa: E402
from grpo_jax.common import data
from grpo_jax.models import architecture
from grpo_jax.models import placement
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning
from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.rl import train_state
from grpo_jax.rollout import sampler
from grpo_jax.run import checkpoint
from grpo_jax.run import config
from grpo_jax.run import loading
from grpo_jax.run import pipeline
from grpo_jax.run import trainer


def tiny_config(workdir, steps=3):
    c = base.get_config()
    c.workdir = str(workdir)
    c.steps = steps
    c.data.digits, c.data.ops, c.data.synthetic_size, c.data.eval_size = 1, "+", 200, 8
    c.grpo.prompts_per_step, c.grpo.num_generations, c.sampling.max_new_tokens = 2, 4, 6
    c.sft.batch_size = 8  # cold_start.steps > 0 makes a run the pipeline cold_start -> grpo
    c.optimizer.learning_rate = 1e-3
    c.eval.every, c.eval.k, c.eval.batch_size = 2, 2, 8
    c.checkpoint.every = 2
    c.log.samples_every = 1
    c.verifier.workers = -1  # score in process: the pool is tested on its own
    return c


def test_end_to_end_writes_metrics_checkpoints_and_evaluates(tmp_path):
    tr = trainer.Trainer(tiny_config(tmp_path))
    out = tr.run()
    tr.close()
    hist = out["history"]
    assert [h["step"] for h in hist] == [0, 1, 2, 3]
    for key in ("loss", "kl", "entropy", "clip_frac", "grad_norm", "reward", "frac_reward_zero_std",
                "mismatch/logp_abs_diff_mean", "rewards/math/mean", "completion_length/mean", "learning_rate"):
        assert key in hist[-1], key
    assert hist[-1]["mismatch/logp_abs_diff_mean"] < 1e-4  # sampler and trainer agree (float32)
    assert "eval/pass@1" in hist[0] and "eval/maj@2" in hist[2] and "eval/pass@2" in hist[-1]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 3]
    from grpo_jax.common.metrics import read_scalars

    scalars = read_scalars(str(tmp_path / "tb"))
    assert {"reward", "loss", "eval/pass@1", "rewards/math/mean"} <= set(scalars)  # the console's names
    assert [s for s, _ in scalars["reward"]] == [1, 2, 3]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = trainer.Trainer(tiny_config(tmp_path / "full", steps=4))
    full.cfg.eval.every = 0
    h_full = full.run()["history"]
    p_full = jax.device_get(full.params)
    full.close()

    part = trainer.Trainer(tiny_config(tmp_path / "part", steps=4))
    part.cfg.eval.every = 0
    part.run(until=2)  # interrupted after step 2 (checkpointed there)
    part.close()
    # beta > 0: the checkpoint records which reference it was trained against; the resumed run
    # rebuilds it from the source, and the result is still bit-exact.

    saved = checkpoint.Checkpoints(str(tmp_path / "part"))
    assert set(saved.manager.item_metadata(2)["state"]) == {"step", "opt_state", "rng", "data"}
    assert (tmp_path / "part" / "checkpoints" / "2" / "reference").is_dir()
    saved.close()
    cfg = tiny_config(tmp_path / "part", steps=4)
    cfg.eval.every, cfg.resume = 0, True
    resumed = trainer.Trainer(cfg)
    h_res = resumed.run()["history"]
    assert resumed.step == 4 and [h["step"] for h in h_res] == [3, 4]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), p_full)
    for a, b in zip(h_res, h_full[2:]):
        assert a["loss"] == b["loss"] and a["reward"] == b["reward"]
    resumed.close()


def test_update_is_a_pure_function_of_state_and_batch(tmp_path):
    """grpo.update without any trainer: a jitted, donated (state, batch) -> (state, metrics) that
    takes one optimizer step, and skips it (state unchanged) when the loss is not finite."""
    import functools



    cfg = tiny_config(tmp_path)
    cfg.optimizer.warmup_steps = 0  # the first update moves the weights
    model_cfg = architecture.SHAPES["tiny"].replace(vocab_size=32)
    mesh = partitioning.make_mesh()
    params = placement.shard_params(transformer.init_params(model_cfg, jax.random.key(0)), model_cfg, mesh)
    tx, _ = train_state.make_optimizer(cfg.optimizer, 10)
    update = jax.jit(functools.partial(grpo.update, model_cfg=model_cfg, loss_cfg=grpo.loss_config(cfg), mesh=mesh,
                                       num_microbatches=1, tx=tx), donate_argnums=0)

    def state_of(p):
        return train_state.create(jax.tree.map(jnp.copy, p), tx, mesh, seed=0,
                                  data={"epoch": 0, "position": 0, "seed": 0})

    batch = {"prompt_ids": np.ones((2, 4), np.int32), "prompt_mask": np.ones((2, 4), bool),
             "completion_ids": np.array([[3, 4, 5], [6, 7, 8]], np.int32), "completion_mask": np.ones((2, 3), bool),
             "advantages": np.array([-1.0, 1.0], np.float32), "old_logp": np.zeros((2, 3), np.float32),
             "ref_logp": np.zeros((2, 3), np.float32)}
    before = jax.device_get(params)
    state, m = update(state_of(params), batch)
    assert float(m["update_skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
    assert int(state.step) == 0  # the update changes parameters and optimizer state, not the step count
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                         jax.tree.leaves(before)))
    # The same inputs give the same state: nothing outside (state, batch) enters.
    again, _ = update(state_of(params), batch)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params), jax.device_get(state.params))
    bad = {**batch, "advantages": np.array([np.nan, 1.0], np.float32)}
    state, m = update(state_of(params), bad)
    assert float(m["update_skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    assert update._cache_size() == 1  # one compile for fresh and updated states alike


def test_command_line_overrides_and_typos(tmp_path):
    script = os.path.join(ROOT, "scripts", "train.py")
    r = subprocess.run([sys.executable, script, "--config.grpo.num_generashuns=4"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "num_generashuns" in r.stderr
    r = subprocess.run([sys.executable, script, "--config.steps=abc"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "steps" in r.stderr
    r = subprocess.run([sys.executable, script, "--config.grpo.max_new_tokens=4"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)  # an old field name: the message names the new one
    assert r.returncode != 0 and "renamed 'sampling.max_new_tokens'" in r.stderr, r.stderr[-2000:]
    # Overrides that train: tests/e2e/test_robustness.py, tests/run/test_checkpoint.py, tests/run/test_pipeline.py.


def raising_reward(prompts, completions, **columns):
    """0.5 for completions of even length; raises on odd ones (scored through the worker pool)."""
    out = []
    for c in completions:
        if len(c) % 2:
            raise ValueError(f"odd length {len(c)}")
        out.append(0.5)
    return out


def test_raising_reward_and_bad_rows_do_not_stop_the_run(tmp_path, capsys):

    rows = data.arithmetic_rows(60, seed=0, digits=1, ops="+")
    bad = [{"question": "What is 1 + 1?", "answer": None}, {"question": "", "answer": "3"},
           {"question": "What is 2 + 2?"}, {"answer": "4"}, {"question": "What is 3 + 3?", "answer": " "}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:30] + bad + rows[30:]))
    cfg = tiny_config(tmp_path / "run", steps=2)
    cfg.data.source = str(path)
    cfg.rewards = {"math": 1.0, "test_trainer:raising_reward": 1.0}
    cfg.verifier.workers = 1
    cfg.optimizer.warmup_steps = 0  # a step without signal makes no update: the first applied one must move
    tr = trainer.Trainer(cfg)
    before = jax.device_get(tr.params)
    hist = tr.run()["history"]
    after = jax.device_get(tr.params)
    tr.close()
    steps = [h for h in hist if h["step"] > 0]
    assert all(h["data/skipped_rows"] == 5 for h in steps)
    n = cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    errors = [h["rewards/errors"] for h in steps]
    assert sum(errors) > 0  # random completions: about half have odd length
    for h, e in zip(steps, errors):  # failed items score 0, the rest 0.5
        assert h["rewards/test_trainer:raising_reward/mean"] == pytest.approx(0.5 * (n - e) / n)
    printed = capsys.readouterr().out
    assert "reward 'test_trainer:raising_reward' failed on " in printed and "last error: ValueError: odd length" in printed
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


HISTORY_KEYS = ("loss", "reward", "kl", "entropy", "grad_norm", "eval/pass@1", "eval/pass@2", "eval/maj@2")


def _mesh_history(workdir, data: int, fsdp: int) -> list[dict]:
    """Two steps of the tiny config on a data x fsdp mesh, with an evaluation after the second."""
    cfg = tiny_config(str(workdir), steps=2)
    cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
    cfg.eval.every, cfg.checkpoint.every = 2, 0
    tr = trainer.Trainer(cfg)
    hist = tr.run()["history"]
    tr.close()
    return [{k: h[k] for k in HISTORY_KEYS if k in h} for h in hist if h["step"]]


# The same function in the 8-device worker; it prints its history as JSON after the trainer's lines.
MESH_PROGRAM = """
import json, jax
from test_trainer import _mesh_history
assert jax.device_count() == 8, jax.devices()
print("RESULT", json.dumps(_mesh_history({workdir!r}, 2, 4)))
"""


def test_steps_on_a_2x4_mesh_of_8_devices_match_one_device(tmp_path, simulated_devices):
    one = _mesh_history(tmp_path / "one", 1, 1)
    out = simulated_devices(MESH_PROGRAM.format(workdir=str(tmp_path / "mesh")), name="2x4 mesh")
    mesh = json.loads(out.split("RESULT", 1)[1])
    assert len(one) == len(mesh) == 2
    for a, b in zip(one, mesh):
        assert a["reward"] == b["reward"]  # same completions
        for k in ("loss", "kl", "entropy", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert {k: v for k, v in mesh[1].items() if k.startswith("eval/")} == \
        {k: v for k, v in one[1].items() if k.startswith("eval/")}


def test_steps_on_two_hosts_of_4_devices_match_one_device(tmp_path):
    """Two hosts (processes) of 4 devices each, the same 2x4 mesh, launched like a multi-host run:
    each reads its own prompts and scores its own completions; the steps match one host's."""
    import socket

    from grpo_jax.common.metrics import read_scalars

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    config_file = tmp_path / "two_hosts.py"
    config_file.write_text(
        "from test_trainer import tiny_config\n\n\ndef get_config():\n"
        f"    c = tiny_config({str(tmp_path / 'hosts')!r}, steps=2)\n"
        "    c.mesh.data, c.mesh.fsdp, c.eval.every, c.checkpoint.every = 2, 4, 2, 0\n    return c\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([ROOT, *TEST_DIRS])}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={config_file}",
                               f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    one = _mesh_history(tmp_path / "one", 1, 1)  # meanwhile, on one device here
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # Both hosts wrote the final checkpoint. Each hashed the files it wrote (process 1: its own
    # ocdbt.process_1 folders) and process 0 merged the shares: every file is in the manifest.
    final = os.path.join(checkpoint.directory(str(tmp_path / "hosts")), "2")
    assert checkpoint.problem(final) is None
    manifest = json.load(open(os.path.join(final, checkpoint.MANIFEST)))
    on_disk = {os.path.relpath(os.path.join(d, f), final) for d, _, fs in os.walk(final) for f in fs}
    assert set(manifest["files"]) == {r for r in on_disk if os.path.basename(r) not in
                                      (checkpoint.MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt")}
    process_1 = {r for r in manifest["files"] if "process_1" in r}
    assert process_1 and manifest["hashed_by_process"]["1"] == len(process_1), manifest["hashed_by_process"]
    assert manifest["hashed_by_process"]["0"] == len(manifest["files"]) - len(process_1)
    scalars = read_scalars(str(tmp_path / "hosts" / "tb"))
    for step, want in enumerate(one, start=1):
        got = {k: dict(scalars[k])[step] for k in want}
        assert got["reward"] == pytest.approx(want["reward"], abs=1e-6)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def test_export_loads_in_transformers_and_evaluates_like_the_checkpoint(tmp_path):
    import dataclasses

    import torch
    import transformers

    cfg = tiny_config(tmp_path / "run", steps=2)
    cfg.eval.every = 0
    tr = trainer.Trainer(cfg)
    tr.run()
    want = tr.evaluate()
    pol = tr.current_policy()
    folder = pol.export_hf(str(tmp_path / "hf"))
    row = tr.task.eval[0]
    ids = pol.prompt_ids([row])[0]
    greedy = dataclasses.replace(pol.sampling, greedy=True)
    ours = sampler.sample(pol.params, pol.model_cfg, [ids], 1, greedy, jax.random.key(0))
    ours = np.asarray(ours.tokens[0, :int(ours.lengths[0])]).tolist()
    tr.close()

    tok = loading.load_tokenizer(cfg.model.__class__(dict(tokenizer=folder)))
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert tok(row["question"])["input_ids"] == ids
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=cfg.sampling.max_new_tokens, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out[0, len(ids):].tolist()[:len(ours)] == ours

    config_file = tmp_path / "tiny.py"
    config_file.write_text(f"from test_trainer import tiny_config\n\n\ndef get_config():\n"
                           f"    return tiny_config({str(tmp_path / 'run')!r}, steps=2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *TEST_DIRS])}
    script = os.path.join(ROOT, "scripts", "evaluate.py")
    for extra in ([], [f"--hf={folder}"]):
        r = subprocess.run([sys.executable, script, f"--config={config_file}", *extra], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout[r.stdout.index("{"):])
        assert got["problems"] == len(tr.task.eval)
        assert {k: got[k] for k in want} == want, (extra, got, want)


@pytest.mark.parametrize("name", ["default", "gsm8k_qwen", "smollm2", "dapo", "dr_grpo", "r1_pipeline", "distill",
                                  "qwen3_8b", "qwen3_8b:lora"])
def test_shipped_configs_load_and_differ_where_they_should(name):
    import importlib

    name, _, arg = name.partition(":")
    module = importlib.import_module(f"configs.{name}")
    c = module.get_config(arg) if arg else module.get_config()
    config.check(c)
    stages = [pipeline.stage_config(c, s) for s in pipeline.stage_names(c)] if pipeline.is_pipeline(pipeline.expand(c)) else [c]
    for s in stages:
        grpo.loss_config(s)  # every loss setting is valid
        train_state.make_optimizer(s.optimizer, s.steps)
        for fn in s.reward_functions.values():
            scoring.get_reward_fn(fn)
    if name == "r1_pipeline":
        assert [s.trainer for s in stages] == ["sft", "grpo", "sft", "grpo"]
        assert stages[2].sft.data == "rejection_samples,demonstrations" and stages[1].init_from == stages[0].workdir
        assert set(stages[3].rewards) == {"math", "overlong", "concise"}
        assert module.concise(None, ["#### 42", " #### -7\n", "#### 42 then", "42"]) == [1.0, 1.0, 0.0, 0.0]
    if name == "dapo":
        assert (c.grpo.clip_eps_high, c.grpo.aggregation, c.grpo.beta, c.grpo.mask_truncated) == (0.28, "token-mean", 0.0, True)
        assert "overlong" in c.rewards
    if name == "qwen3_8b":  # ZeRO-3 over every device, bf16 over float32 masters; 512 rows in 2 x 4 parts
        assert (c.mesh.fsdp, c.model.dtype, c.model.param_dtype, c.model.remat) == (-1, "bfloat16", "float32", "full")
        assert c.grpo.prompts_per_step * c.grpo.num_generations == 512 and c.model.lora.rank == (16 if arg else 0)
    if name == "dr_grpo":
        assert (c.grpo.advantage_estimator, c.grpo.aggregation) == ("dr_grpo", "seq-mean-token-sum-norm")
        assert grpo.loss_config(c).scale_rewards is None  # the estimator's own choice: no std division
    if name == "default":  # the cold start is a stage of its own, with the cold_start overrides
        assert [s.trainer for s in stages] == ["sft", "grpo"] and stages[0].steps == 600
        assert stages[0].optimizer.b2 == 0.999 and stages[0].optimizer.warmup_steps == 0
        assert stages[1].init_from == stages[0].workdir and stages[1].optimizer.b2 == c.optimizer.b2


def test_smollm2_config_builds_offline(tmp_path, smollm2_dir):
    from configs import smollm2

    c = smollm2.get_config()
    c.workdir, c.verifier.workers = str(tmp_path), -1
    c.cold_start.steps = 0  # the GRPO stage's trainer on the raw weights (the recipe's cold start is a stage)
    tr = trainer.Trainer(c)
    try:
        pol = tr.policy
        assert pol.sampling.eos_ids == (pol.tokenizer.convert_tokens_to_ids("<|im_end|>"),)
        ids = pol.prompt_ids(tr.task.eval[:1])[0]
        text = pol.tokenizer.decode(ids)
        assert "<|im_start|>user" in text and c.data.instruction in text and text.endswith("<|im_start|>assistant\n")
    finally:
        tr.close()


def test_plot_metrics_draws_reward_and_eval_curves(tmp_path):
    from grpo_jax.common.metrics import MetricWriter

    w = MetricWriter(str(tmp_path / "tb"))
    for step in range(1, 31):
        w.scalars({"reward": step / 30, "rewards/math/mean": step / 30}, step)
    for step in (0, 15, 30):
        w.scalars({"eval/pass@1": step / 40, "eval/mean@1_sampled": step / 50}, step)
    w.close()
    out = tmp_path / "plot.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"), f"--workdir={tmp_path}",
                        f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    empty = tmp_path / "empty"
    (empty / "tb").mkdir(parents=True)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"), f"--workdir={empty}",
                        f"--out={tmp_path / 'x.png'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no training metrics" in r.stderr
    # Two runs on one plot, each named (a run with a cold start is read from its grpo stage).
    (tmp_path / "staged").mkdir()
    shutil.copytree(tmp_path / "tb", tmp_path / "staged" / "grpo" / "tb")
    two = tmp_path / "two.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"), f"--workdir={tmp_path}",
                        "--label=A", f"--workdir={tmp_path / 'staged'}", "--label=B", f"--out={two}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert two.stat().st_size > out.stat().st_size  # more curves
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"), f"--workdir={tmp_path}",
                        f"--workdir={tmp_path}", "--label=A", f"--out={two}"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "1 --label for 2 --workdir" in r.stderr


def test_model_overrides_pad_the_vocabulary_never_shrink_it():
    from ml_collections import ConfigDict


    mcfg = ConfigDict(dict(source="shape:tiny", overrides={"vocab_size": 128}, dtype="float32",
                           param_dtype="float32", remat="none", attention="einsum"))
    cfg = loading.model_config(mcfg, 100)
    assert cfg.vocab_size == 128 and transformer.param_shapes(cfg)["embedding"].shape == (128, cfg.hidden_size)
    mcfg.overrides = {"vocab_size": 64}
    with pytest.raises(ValueError, match="vocab_size=64 is smaller than the tokenizer's 100"):
        loading.model_config(mcfg, 100)


def _compile_counts(mesh: tuple[int, int]) -> list[int]:
    """Programs traced or compiled (JAX's monitoring events, of this thread) in a first step of a run
    on `mesh` (data, fsdp), bf16 compute on float32 masters, in the same step run twice more from a copy
    of the state it started from (same data, rng and parameters: nothing changed), and in one new
    program (the listener works). A failure prints what compiled again."""
    import tempfile
    import threading

    from jax import monitoring

    events = []  # (event, program): this thread's only (a checkpoint's threads are not the step)
    main = threading.get_ident()
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: threading.get_ident() == main and events.append((name, kw.get("fun_name"))))
    cfg = tiny_config(tempfile.mkdtemp(), steps=3)
    cfg.eval.every, cfg.model.dtype, cfg.model.param_dtype = 0, "bfloat16", "float32"
    cfg.mesh.data, cfg.mesh.fsdp = mesh
    tr = trainer.Trainer(cfg)
    start = jax.tree.map(lambda x: x.copy(), tr.state)  # the step donates its state
    counts = []
    for step in range(3):
        if step:
            tr.state = jax.tree.map(lambda x: x.copy(), start)
        n = len(events)
        tr.train_step()
        counts.append(sum("compile" in e or "trace" in e for e, _ in events[n:]))
        if step and counts[-1]:
            print("compiled again:", events[n:])
    n = len(events)
    jax.jit(lambda x: x * 1.2345)(jnp.ones(3)).block_until_ready()
    counts.append(sum("compile" in e or "trace" in e for e, _ in events[n:]))
    tr.close()
    return counts


def test_a_second_identical_step_traces_and_compiles_nothing(tmp_path, simulated_devices):
    """One device (here), and a data-only mesh of 8 (where the sampler's weight copy used to be
    jitted afresh per rollout): after the first step, nothing is traced or compiled again."""
    one = _compile_counts((1, 1))
    out = simulated_devices("import json\nfrom test_trainer import _compile_counts\n"
                            "print('RESULT', json.dumps(_compile_counts((8, 1))))", name="recompiles")
    for counts in (one, json.loads(out.split("RESULT", 1)[1])):
        assert counts[1:3] == [0, 0] and counts[3] > 0, counts


class _OtherHost:
    """trainer's `multihost` as seen with a second host that raises `flags` (signal number, save
    failed) after step `at`: what `Trainer._agree` gathers from every host."""

    def __init__(self, at: int, flags: tuple[int, int]):
        self.at, self.flags, self.steps = at, flags, 0

    def host_max(self, values):
        self.steps += 1
        other = self.flags if self.steps >= self.at else (0, 0)
        return tuple(max(a, b) for a, b in zip(values, other))


def test_a_signal_or_a_failed_save_on_another_host_stops_every_host_at_the_same_step(tmp_path, monkeypatch, capsys):
    """Stopping is agreed after each step: a host that got no SIGTERM stops with the one that did,
    saving the same step (a host deciding alone saved while the others sampled: a hang); a save that
    failed on another host stops this one too, in one line."""
    cfg = tiny_config(tmp_path / "signal", steps=6)
    cfg.eval.every, cfg.checkpoint.every = 0, 100
    monkeypatch.setattr(trainer, "multihost", _OtherHost(at=2, flags=(int(signal.SIGTERM), 0)))
    tr = trainer.Trainer(cfg)
    with pytest.raises(SystemExit) as stopped:
        tr.run()
    tr.close()
    assert stopped.value.code == 128 + signal.SIGTERM and tr.step == 2
    assert "stopped by SIGTERM at step 2/6: checkpoint saved" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "signal" / "checkpoints")) == ["2"]

    cfg = tiny_config(tmp_path / "save", steps=6)
    cfg.eval.every = 0
    monkeypatch.setattr(trainer, "multihost", _OtherHost(at=3, flags=(0, 1)))
    tr = trainer.Trainer(cfg)
    with pytest.raises(checkpoint.CheckpointError, match="a checkpoint save failed on another host at step 3"):
        tr.run()
    tr.close(quiet=True)
