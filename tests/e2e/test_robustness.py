"""Faults an operator meets, each provoked for real: a scheduler's SIGTERM, Ctrl-C, a second run into a
busy workdir, config values that cannot work. What is said, the exit status, what was saved."""

import copy
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import default
from grpo_jax.common import data
from grpo_jax.common import metrics
from grpo_jax.rollout import policy
from grpo_jax.rollout import sampler
from grpo_jax.run import config
from grpo_jax.run import loading
from grpo_jax.run import workdir_lock
import short_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The short run's arguments (tests/short_run.py), saving no checkpoint of its own accord.
SHORT = [*short_run.ARGS, "--config.checkpoint.every=100"]


def _train(workdir, *extra, **kw):
    return subprocess.Popen([sys.executable, "scripts/train.py", f"--config.workdir={workdir}", *SHORT, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_line(p, prefix: str) -> list[str]:
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting {prefix!r}; got {lines}; stderr {p.stderr.read()}")


def test_sigterm_saves_the_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, short_run_dir):
    p = _train(tmp_path / "stopped")
    _wait_for_line(p, "step 3/8")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split("/")[0])
    assert 3 <= stopped_at < 8 and "checkpoint saved in" in out
    assert "Traceback" not in err and "finishing this step" in err
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == [str(stopped_at)]  # nothing lost

    resumed = _train(tmp_path / "stopped", "--config.resume=True")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from step {stopped_at}" in out

    a = metrics.read_scalars(str(tmp_path / "stopped" / "tb"))
    b = metrics.read_scalars(os.path.join(short_run_dir, "tb"))  # the same run, never stopped
    for key in ("loss", "reward", "grad_norm"):
        assert dict(a[key]) == dict(b[key]) and len(dict(b[key])) == 8, key


def test_ctrl_c_stops_quietly_and_a_second_one_stops_at_once(tmp_path):
    # Ctrl-C signals the whole foreground process group: the trainer and its verifier workers.
    p = _train(tmp_path / "run", start_new_session=True)
    _wait_for_line(p, "step 2/8")
    os.killpg(p.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGINT, err  # 130, as a shell reports Ctrl-C
    assert err.strip().splitlines()[-1].startswith("SIGINT again: stopped at once")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err  # the workers ignored it too


def test_a_second_run_into_a_busy_workdir_stops_naming_the_holder(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path)):
        p = _train(tmp_path)
        out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err, err  # one line
    assert f"is in use by pid {os.getpid()}" in err.strip().splitlines()[-1] and "another workdir" in err
    assert not (tmp_path / "checkpoints").exists()
    # A holder killed with -9 leaves the file but not the lock: the next run takes it over.
    holder = subprocess.Popen([sys.executable, "-c", f"from grpo_jax.run import workdir_lock; import time; "
                               f"lock = workdir_lock.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid}"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()


@pytest.mark.parametrize("field,value,message", [
    ("optimizer.learning_rate", -1.0, "optimizer.learning_rate=-1.0; expected a finite number > 0"),
    ("steps", -5, "steps=-5; expected an integer >= 1"),
    ("grpo.num_iterations", 0, "grpo.num_iterations=0; expected an integer >= 1"),
    ("grpo.prompts_per_step", 0, "grpo.prompts_per_step=0; expected an integer >= 1"),
    ("sft.batch_size", 0, "sft.batch_size=0; expected an integer >= 1"),
    ("grpo.num_generations", 1, "grpo.num_generations=1; expected >= 2"),
    ("grpo.minibatches", 3, "= 128 completions do not split into grpo.minibatches=3"),
    ("grpo.microbatches", 3, "grpo.microbatches=3 equal parts"),
    ("sampling.eos_ids", (-5,), "sampling.eos_ids=(-5,); expected token ids >= 0"),
])
def test_values_that_cannot_work_are_named_before_any_work(field, value, message):
    cfg = copy.deepcopy(default.get_config())
    *parents, leaf = field.split(".")
    node = cfg
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.check(cfg)


def test_the_mesh_and_the_batches_it_splits_are_checked_before_any_work(tmp_path):
    cfg = default.get_config()
    cfg.grpo.prompts_per_step, cfg.grpo.num_generations, cfg.grpo.microbatches = 2, 4, 2  # 4 rows per chunk
    config.check_mesh(cfg, num_devices=4)
    with pytest.raises(config.ConfigError, match=r"mesh=\{'data': 3, .* does not fit the 8 devices"):
        cfg.mesh.data = 3
        config.check_mesh(cfg, num_devices=8)
    cfg.mesh.data = -1
    with pytest.raises(config.ConfigError, match=r"= 4 rows per update chunk do not split over the mesh's batch axes "
                                                 r"\(data x fsdp x expert = 8 of 8 devices\): with 2 hosts they must"):
        config.check_mesh(cfg, num_devices=8, num_processes=2)
    with pytest.warns(UserWarning, match="each update chunk is replicated"):
        config.check_mesh(cfg, num_devices=8)
    cfg.mesh.tensor = 2  # 4 batch shards x 2: fits
    config.check_mesh(cfg, num_devices=8, num_processes=2)
    cfg.mesh.dcn_data = 2  # the data axis (4) over the 2 hosts
    config.check_mesh(cfg, num_devices=8, num_processes=2)
    for dcn, hosts in ((3, 3), (4, 2)):
        cfg.mesh.dcn_data = dcn
        with pytest.raises(config.ConfigError, match=rf"mesh.dcn_data={dcn}: expected a divisor of the data axis \(4\) "
                                                     rf"and of the {hosts} hosts"):
            config.check_mesh(cfg, num_devices=8, num_processes=hosts)
    cfg.mesh.dcn_data = 1
    # Through train.py, before anything is loaded: one line, nothing written.
    p = subprocess.run([sys.executable, "scripts/train.py", f"--config.workdir={tmp_path}", "--config.cold_start.steps=0",
                        "--config.mesh.fsdp=2", "--config.mesh.data=2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        "config: mesh={'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 1} does not fit the 1 devices (the sizes multiply "
        "to the device count; one of them may be -1)")
    assert not (tmp_path / "checkpoints").exists()


def test_the_command_line_names_bad_fields_in_one_line_and_takes_lists(tmp_path):
    def run(*args):
        p = subprocess.run([sys.executable, "scripts/train.py", f"--config.workdir={tmp_path}", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stderr.strip().splitlines()

    rc, err = run("--config.sampling.eos_id=[2]")
    assert rc and len(err) == 1 and "has no field 'sampling.eos_id'; did you mean sampling.eos_ids" in err[0]
    rc, err = run("--config.optimizer.learning_rate=-1")
    assert rc and err == ["config: optimizer.learning_rate=-1.0; expected a finite number > 0 (a negative rate "
                          "ascends the loss)"]
    # A list is a tuple field's value too; an id outside the vocabulary stops before the weights load.
    rc, err = run("--config.sampling.eos_ids=[99999]")
    assert rc and err[-1] == "config: sampling.eos_ids=(99999,): [99999] outside the vocabulary of 99 tokens"
    assert not (tmp_path / "checkpoints").exists()


def test_unusable_data_files_are_named_with_the_reason(tmp_path):

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "no_answer.jsonl").write_text('{"question": "1 + 1?", "solution": "2"}\n{"question": "2 + 2?"}\n')
    (tmp_path / "bytes.jsonl").write_bytes(b'{"question": "1 + 1?", "answer": "2"}\n{"question": "\xff\xfe", "answer": "1"}\n')
    need = ("question", "answer")
    with pytest.raises(ValueError, match="empty.jsonl holds no rows"):
        data.load_rows(str(tmp_path / "empty.jsonl"), required=need)
    with pytest.raises(ValueError, match=r"every one of its 2 rows lacks a required field \('answer' missing or empty "
                                         r"in 2; .*the rows have \['question', 'solution'\]"):
        data.load_rows(str(tmp_path / "no_answer.jsonl"), required=need)
    with pytest.raises(ValueError, match="bytes.jsonl, line 2: UnicodeDecodeError"):
        data.load_rows(str(tmp_path / "bytes.jsonl"), required=need)


def test_prompts_too_long_to_sample_are_skipped_at_load_time_and_counted(tmp_path):
    import json

    rows = [{"question": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)} for i in range(40)]
    rows[17]["question"] = "What is " + "1 + " * 250_000 + "1?"  # 1 MB: used to stop the run when drawn
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = _train(tmp_path / "run", f"--config.data.source={tmp_path / 'train.jsonl'}", "--config.steps=12")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "prompts are longer than the largest prompt bucket (1024 tokens, sampling.prompt_buckets): skipped" in out
    first = [line for line in out.splitlines() if line.startswith("data: ")]
    assert len(first) == 1 and ("1 of 36 training and 0 of 4" in first[0] or "0 of 36 training and 1 of 4" in first[0])
    skipped = dict(metrics.read_scalars(str(tmp_path / "run" / "tb"))["data/skipped_rows"])
    assert set(skipped.values()) == {1.0} and len(skipped) == 12  # 12 steps x 4 prompts: every row drawn


def test_only_prompts_too_long_to_sample_is_an_error_before_training(tmp_path):

    task = data.Task(train=[{"q": "x" * 50}] * 3, eval=[{"q": "y"}], skipped=0)
    with pytest.raises(ValueError, match=r"3 of 3 training and 0 of 1 held-out prompts are longer than the largest "
                                         r"prompt bucket \(16 tokens.*nothing would be left to train on"):
        data.without_long_prompts(task, lambda rows: [i for i, r in enumerate(rows) if len(r["q"]) > 16], 16)
    kept, line = data.without_long_prompts(task, lambda rows: [], 16)
    assert kept is task and line == ""


@pytest.mark.parametrize("tok,template", [("char", "plain"), ("qwen2", "chat"), ("smollm2", "chat"), ("qwen2", "plain")])
def test_too_long_is_exact_while_tokenising_only_the_rows_that_might_be(tok, template):
    import random

    from ml_collections import ConfigDict


    tokenizer = loading.load_tokenizer(ConfigDict({"tokenizer": tok}))
    pieces = ["7", " plus ", "é", "数学", "🙂", "\n", "  ", "x" * 5]
    rng = random.Random(0)
    rows = [{"question": "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))} for _ in range(300)]
    fmt = policy.PromptFormat(template=template, instruction="Answer with a number.")
    lengths = [len(fmt.ids(r, tokenizer)) for r in rows]
    limit = sorted(lengths)[len(rows) // 2]  # half the rows are too long
    pol = policy.Policy(params=None, model_cfg=None, tokenizer=tokenizer, mesh=None, prompt=fmt,
                        sampling=sampler.SamplingConfig(prompt_buckets=(8, limit)))
    exact = [i for i, n in enumerate(lengths) if n > limit]
    calls = []
    counting = policy.PromptFormat.ids
    try:
        policy.PromptFormat.ids = lambda self, row, t: calls.append(1) or counting(self, row, t)
        assert pol.too_long(rows) == exact
    finally:
        policy.PromptFormat.ids = counting
    assert len(calls) < len(rows)  # rows too short to matter were not tokenised


def test_reward_functions_that_misbehave_are_named_one_that_hangs_is_disabled_one_that_always_fails_stops(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "import time\n"
        "def hangs(prompts, completions, **columns):\n    time.sleep(3600)\n"
        "def nan_on_odd(prompts, completions, **columns):\n"
        "    return [float('nan') if len(c) % 2 else 1.0 for c in completions]\n"
        "def broken(prompts, completions, **columns):\n    raise KeyError('gold')\n")
    (tmp_path / "config.py").write_text(
        "from configs import default\n"
        "def get_config():\n"
        "    c = default.get_config()\n"
        "    c.reward_functions = {'slow': 'my_rewards:hangs', 'odd': 'my_rewards:nan_on_odd', 'bad': 'my_rewards:broken'}\n"
        "    c.rewards = {'math': 1.0, 'slow': 0.0, 'odd': 0.5, 'bad': 1.0}\n"  # slow only logs
        "    c.verifier.timeout_s, c.verifier.hang_after, c.verifier.max_failing_steps = 0.5, 4, 3\n"
        "    return c\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "scripts/train.py", f"--config={tmp_path / 'config.py'}",
                          f"--config.workdir={tmp_path / 'run'}", *SHORT, "--config.steps=5"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = p.communicate(timeout=300)
    assert time.monotonic() - t < 120  # 16 completions x 3 steps x 0.5 s would be 24 s more of waiting alone
    # The weighted function that raises on every completion stops the run at its third step, in one line.
    assert p.returncode == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == (
        "step 3: reward 'bad' failed on every completion of 3 consecutive steps (verifier.max_failing_steps=3): "
        "the run stops instead of training on zeros; last error: KeyError: 'gold'"), err[-3000:]
    disabled = [line for line in out.splitlines() if "disabled for the rest of the run" in line]
    assert len(disabled) == 1 and disabled[0].startswith("reward 'slow' timed out on the first ")
    assert "(weight 0: it only logs)" in disabled[0]
    assert "step 1: reward 'slow' failed on 16 of 16 completions, scored 0 (errors 0, timeouts 16" in out
    odd = [line for line in out.splitlines() if line.startswith("step ") and "reward 'odd' failed on" in line]
    assert len(odd) == 2 and all("last error: returned nan: rewards must be finite" in line for line in odd)
    tb = metrics.read_scalars(str(tmp_path / "run" / "tb"))
    assert [v for _, v in tb["rewards/slow/timeouts"]] == [16.0] and len(tb["rewards/odd/errors"]) == 2
    assert not os.path.exists(tmp_path / "run" / "stage.json")  # the stage is not marked finished


def test_a_dataset_the_run_cannot_use_stops_in_one_line_before_the_model_loads(tmp_path):
    from grpo_jax.common import data

    bad = {"empty.jsonl": b"", "utf8.jsonl": b'{"question": "\xff", "answer": "1"}\n',
           "json.jsonl": b'{"question": "1+1", "answer": "2"}\n{"question": oops}\n',
           "fields.jsonl": b'{"question": "1+1", "solution": "2"}\n'}
    messages = {}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        cfg = default_config(tmp_path / name)
        with pytest.raises(data.DataError) as e:
            data.load_task(cfg.data, cfg.seed)
        messages[name] = str(e.value)
    assert "holds no rows" in messages["empty.jsonl"] and "line 2" in messages["json.jsonl"]
    assert "UnicodeDecodeError" in messages["utf8.jsonl"] and "lacks a required field" in messages["fields.jsonl"]
    # through the script: one line, and the model never loaded (no "loading" of its weights happened)
    for args in ([f"--config.data.source={tmp_path / 'json.jsonl'}"], ["--config.data.eval_size=100000"]):
        p = subprocess.run([sys.executable, "scripts/train.py", f"--config.workdir={tmp_path / 'run'}",
                            "--config.cold_start.steps=0", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert ("line 2" if "json" in args[0] else "eval_size=100000") in p.stderr.strip().splitlines()[-1]


def default_config(source):
    from configs import default

    c = default.get_config()
    c.data.source, c.data.eval_size = str(source), 0
    return c


def test_event_files_hold_the_console_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = metrics.MetricWriter(str(tmp_path / "new"))
    writer.write({"eval/pass@1": 0.5, "eval/maj@4": 0.75, "reward": float("nan")}, 3)
    writer.close()
    tb = EventAccumulator(str(tmp_path / "new"))
    tb.Reload()
    assert sorted(tb.Tags()["scalars"]) == ["eval/maj@4", "eval/pass@1"]  # what TensorBoard shows; NaN left out
    assert [(e.step, e.value) for e in tb.Scalars("eval/pass@1")] == [(3, 0.5)]
    assert metrics.read_scalars(str(tmp_path / "new")) == {"eval/pass@1": [(3, 0.5)], "eval/maj@4": [(3, 0.75)]}


def test_progress_lines_come_from_the_start_without_a_terminal(tmp_path):
    # stdout is a pipe (no progress bar) and log.every is larger than the run: the step lines come
    # from the first step and from log.every_s, in the cold start too.
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "scripts/train.py", f"--config.workdir={tmp_path}", "--config.cold_start.steps=40",
                          "--until_stage=cold_start", "--config.log.every=1000", "--config.log.every_s=0.3",
                          "--config.data.eval_size=4", "--config.eval.k=1"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = [(time.monotonic() - t, line) for line in p.stdout]
    assert p.wait() == 0
    assert lines[0][1].startswith("== stage cold_start") and lines[0][0] < 15  # before the model loads
    assert lines[1][1].startswith(f"sft run in {tmp_path / 'cold_start'}: loading shape:tiny")
    cold = [int(line.split()[1].split("/")[0]) for _, line in lines if line.startswith("step ") and "/40 " in line]
    assert cold[0] == 1 and cold[-1] == 40 and len(cold) >= 3, cold  # first, time-based, last


# The uninterrupted run of the two-host test, in one process of 4 simulated devices (the same mesh).
ONE_PROCESS_RUN = """
import importlib.util, json
from grpo_jax.common import metrics
from grpo_jax.run import pipeline
spec = importlib.util.spec_from_file_location("two_hosts", "{config}")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cfg = module.get_config()
cfg.workdir = "{workdir}"
pipeline.run(cfg)
print("RESULT", json.dumps({{k: dict(v) for k, v in metrics.read_scalars("{workdir}/tb").items()}}))
"""


@pytest.mark.slow
@pytest.mark.xdist_group("ports")
def test_sigterm_to_one_of_two_hosts_stops_both_at_one_step_and_the_resumed_run_equals_an_uninterrupted_one(
        tmp_path, simulated_devices):
    """A scheduler signals one host of two (2 processes x 2 devices, scripts/train.py): both finish the
    same step, save it together and exit 143 (a host that stopped alone used to save while the other
    sampled: both hung, and the lone save failed); resumed, the two hosts end where one process of the
    same 4 devices does without a stop."""
    import json
    import socket

    from conftest import TEST_DIRS
    from grpo_jax.run import checkpoint

    config_file = tmp_path / "two_hosts.py"
    config_file.write_text(
        "from test_trainer import tiny_config\n\n\ndef get_config():\n"
        f"    c = tiny_config({str(tmp_path / 'run')!r}, steps=6)\n"
        "    c.mesh.data, c.mesh.fsdp, c.eval.every, c.checkpoint.every, c.log.every = 2, 2, 0, 100, 1\n    return c\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([ROOT, *TEST_DIRS])}

    def hosts(*extra):
        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            port = sock.getsockname()[1]
        return [subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={config_file}",
                                  f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                                  *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]

    procs = hosts()
    try:
        seen = _wait_for_line(procs[0], "step 2/6")
        procs[1].send_signal(signal.SIGTERM)  # the host that does not print
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    out = "".join(seen) + outs[0][0]
    stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split("/")[0])
    assert 2 <= stopped_at < 6 and "checkpoint saved in" in out
    folder = checkpoint.directory(str(tmp_path / "run"))
    assert sorted(os.listdir(folder)) == [str(stopped_at)]
    assert checkpoint.problem(os.path.join(folder, str(stopped_at))) is None

    procs = hosts("--config.resume=True")
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    resumed = metrics.read_scalars(str(tmp_path / "run" / "tb"))
    program = ONE_PROCESS_RUN.format(config=config_file, workdir=tmp_path / "one")
    whole = json.loads(simulated_devices(program, devices=4, name="one process").split("RESULT", 1)[1])
    for key in ("loss", "reward", "kl", "grad_norm"):
        got, want = dict(resumed[key]), {int(k): v for k, v in whole[key].items()}
        assert sorted(got) == sorted(want) == list(range(1, 7)), key
        assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-4, abs=1e-6), key
