"""Run configs: one sampling section, unset fields are None, and old field names stop with the new one
(in a config file, a pipeline stage, on the command line, and in stage markers written before)."""

import json
import re
import os
import subprocess
import sys

import pytest
from conftest import TEST_DIRS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import base  # noqa: E402
from grpo_jax.common import data
from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.run import config
from grpo_jax.run import loading
from grpo_jax.run import pipeline


def test_every_sampling_setting_is_in_one_section_and_unset_means_none():
    c = base.get_config()
    assert {"max_new_tokens", "temperature", "top_k", "top_p", "eos_ids", "prompt_buckets"} <= set(c.sampling)
    assert "max_new_tokens" not in c.grpo and "temperature" not in c.grpo
    for path in ("grpo.clip_eps_high", "grpo.dual_clip", "grpo.scale_rewards", "sft.max_completion_tokens",
                 "sft.examples", "rejection.max_problems", "data.eval_split", "init_from"):
        section, _, name = path.rpartition(".")
        assert (c[section] if section else c)[name] is None, path
    loss_cfg = grpo.loss_config(c)
    assert loss_cfg.clip_eps_high is None and loss_cfg.eps_high == c.grpo.clip_eps_low and loss_cfg.dual_clip is None
    assert loss_cfg.reward_scaling == "group" and loss_cfg.max_completion_length == c.sampling.max_new_tokens
    c.grpo.clip_eps_high, c.grpo.dual_clip, c.grpo.scale_rewards = 0.28, 3.0, "batch"  # typed placeholders
    loss_cfg = grpo.loss_config(c)
    assert (loss_cfg.eps_high, loss_cfg.dual_clip, loss_cfg.reward_scaling) == (0.28, 3.0, "batch")


@pytest.mark.parametrize("old,new", sorted(config.RENAMED.items()))
def test_an_old_field_name_stops_with_the_new_one(old, new):
    c = base.get_config()
    section, _, name = old.rpartition(".")
    c[section][name] = 1  # what an old config file does (get_config works on an unlocked ConfigDict)
    with pytest.raises(ValueError, match=f"'{old}' was renamed '{new}'"):
        config.check(c)
    # ... and inside a pipeline stage's overrides
    p = base.get_config()
    p.stages = "a"
    p.stage = {"a": {"trainer": "grpo", section: {name: 1}}}
    with pytest.raises(ValueError, match=f"renamed '{new}'"):
        pipeline.stage_config(p, "a")


def test_old_unset_sentinels_are_refused_where_they_would_change_meaning():
    c = base.get_config()
    c.grpo.clip_eps_high = 0.0  # used to mean "the same as clip_eps_low"; now it would mean no upside
    with pytest.raises(ValueError, match=r"grpo.clip_eps_high=0.0: 0.0 no longer means the same as clip_eps_low"):
        config.check(c)
    c = base.get_config()
    c.sft.examples = 0
    with pytest.raises(ValueError, match="sft.examples=0"):
        config.check(c)
    config.check(base.get_config())  # the defaults pass


def test_command_line_old_name_and_tuple_fields(tmp_path):
    script = os.path.join(ROOT, "scripts", "evaluate.py")
    r = subprocess.run([sys.executable, script, "--config.grpo.temperature=0.7"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "renamed 'sampling.temperature'" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_stage_marker_is_matched_by_its_fingerprint_and_an_old_one_stops_in_one_line(tmp_path):
    c = base.get_config()
    c.stages, c.stage = "a", {"a": {"trainer": "grpo"}}
    now = pipeline.stage_settings(pipeline.stage_config(c, "a"))
    stamp = pipeline.fingerprint(now)
    assert pipeline._same_stage("a", str(tmp_path), {"fingerprint": stamp, "settings": now}, stamp)
    c.stage = {"a": {"trainer": "grpo", "grpo": {"dynamic_sampling": True}}}
    changed = pipeline.stage_settings(pipeline.stage_config(c, "a"))
    assert changed["grpo.dynamic_sampling"] is True and pipeline.fingerprint(changed) != stamp
    assert not pipeline._same_stage("a", str(tmp_path), {"fingerprint": stamp, "settings": now},
                                    pipeline.fingerprint(changed))
    # LoRA's other fields do not count without adapters: a full stage under a LoRA config's shared fields.
    c.stage = {"a": {"trainer": "grpo", "model": {"lora": {"alpha": 64.0}}}}
    assert pipeline.fingerprint(pipeline.stage_settings(pipeline.stage_config(c, "a"))) == stamp
    # A stage's settings are the fields its trainer reads: GRPO's do not change a finished cold start,
    # whose marker (written before that rule too, with every field) still matches.
    c.stages, c.stage = "cold,a", {"cold": {"trainer": "sft"}, "a": {"trainer": "grpo"}}
    cold = pipeline.stage_settings(pipeline.stage_config(c, "cold"))
    assert not [k for k in cold if k.startswith("grpo.")] and "sft.batch_size" in cold
    c.grpo.beta, c.grpo.clip_eps_high = 0.5, 0.4
    assert pipeline.stage_settings(pipeline.stage_config(c, "cold")) == cold
    assert pipeline.stage_settings(pipeline.stage_config(c, "a"))["grpo.beta"] == 0.5
    assert not [k for k in pipeline.stage_settings(pipeline.stage_config(c, "a")) if k.startswith("sft.")]
    old_marker = pipeline.fingerprint(pipeline.stage_settings(pipeline.stage_config(c, "cold"), legacy=True))
    now_stamps = (pipeline.fingerprint(cold), old_marker)
    assert pipeline._same_stage("cold", str(tmp_path), {"fingerprint": old_marker}, now_stamps)
    c.sft.batch_size = 4  # a field the cold start reads: not the same stage
    assert pipeline.fingerprint(pipeline.stage_settings(pipeline.stage_config(c, "cold"))) not in now_stamps
    c.stages, c.stage, c.sft.batch_size = "a", {"a": {"trainer": "grpo"}}, base.get_config().sft.batch_size
    c.grpo.beta, c.grpo.clip_eps_high = base.get_config().grpo.beta, base.get_config().grpo.clip_eps_high
    # A marker of the format before fingerprints (settings only) is not trusted: one line, what to do.
    with pytest.raises(ValueError, match=r"stage 'a' in .* predates .*--config.init_from="):
        pipeline._same_stage("a", str(tmp_path), {"settings": now}, stamp)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stage.json").write_text(json.dumps({"name": "a", "settings": now}))
    c.workdir, c.steps = str(tmp_path), 1
    c.stage = {"a": {"trainer": "grpo"}}
    with pytest.raises(ValueError, match="predates"):
        pipeline.run(c)


MESH_CHECKS = """
import sys, warnings
sys.path[:0] = [{root!r}, *{tests!r}]
import jax
from test_trainer import tiny_config
from grpo_jax.common import data
from grpo_jax.rewards import scoring
from grpo_jax.rl import grpo
from grpo_jax.run import loading
assert jax.device_count() == 4
cfg = tiny_config({workdir!r})
cfg.mesh.data, cfg.mesh.tensor = 1, 4
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pol, _ = loading.load(cfg)
print("WARN", " | ".join(str(w.message) for w in caught))
cfg = tiny_config({workdir!r})
cfg.grpo.prompts_per_step, cfg.grpo.num_generations = 1, 2  # 2 completions on 4 data-parallel devices
pol, _ = loading.load(cfg)
try:
    grpo.GRPO.from_config(cfg, pol, scoring.Scorer("question", 6, workers=-1), data.load_task(cfg.data, cfg.seed))
except ValueError as e:
    print("ERROR", e)
"""


def test_mesh_mismatches_are_named_before_any_work(tmp_path, simulated_devices):
    """A weight dimension the mesh cannot split is named in a warning (it is replicated); a batch
    that does not split over the data-parallel devices stops at set-up, naming the fields."""
    code = MESH_CHECKS.format(root=ROOT, tests=TEST_DIRS, workdir=str(tmp_path))
    out = simulated_devices(code, devices=4, name="MESH_CHECKS")
    warn = out.split("WARN", 1)[1].split("\n", 1)[0]
    assert "layers/attn/k_proj/kernel: kv_heads 2 over tensor 4" in warn and "q_proj" not in warn
    error = out.split("ERROR", 1)[1]
    assert "grpo.prompts_per_step x grpo.num_generations = 1 x 2 = 2" in error and "data x fsdp = 4" in error


def test_minibatches_that_do_not_split_the_batch_stop_at_set_up(tmp_path):
    from test_trainer import tiny_config


    cfg = tiny_config(tmp_path)
    cfg.grpo.minibatches = 3  # 2 prompts x 4 completions = 8 rows
    pol, _ = loading.load(cfg)
    with pytest.raises(ValueError, match=r"= 8 completions per step must split into grpo.minibatches=3"):
        grpo.GRPO.from_config(cfg, pol, scoring.Scorer("question", 6, workers=-1), data.load_task(cfg.data, cfg.seed))


@pytest.mark.xdist_group("sandbox")  # sandboxes: with the others (test_sandbox counts them)
def test_verifier_sandbox_is_checked_and_reaches_the_code_reward():

    c = base.get_config()
    assert c.verifier.sandbox == "auto"
    c.verifier.sandbox = "chroot"
    with pytest.raises(ValueError, match=r"verifier.sandbox='chroot'; expected one of \('auto', 'namespaces', 'python'\)"):
        config.check(c)
    c.verifier.sandbox = "python"
    scorer = scoring.Scorer.from_config(c)
    assert scorer.columns([{"question": "q"}], 2, [3, 4])["sandbox"] == ["python", "python"]


@pytest.mark.parametrize("field,value,message", [
    ("grpo.beta", -1.0, "grpo: beta=-1.0 must be >= 0"),
    ("grpo.clip_eps_low", 2.0, "grpo: clip range needs 0 <= clip_eps_low < 1"),
    ("grpo.dual_clip", 0.5, "grpo: dual_clip=0.5 must be > 1"),
    ("grpo.kl_estimator", "k9", "grpo: kl_estimator='k9'; expected one of"),
    ("verifier.max_failing_steps", 0, "verifier.max_failing_steps=0; expected an integer >= 1"),
    ("verifier.load_timeout_s", -1.0, "verifier.load_timeout_s=-1.0; expected seconds > 0"),
])
def test_the_rl_stage_settings_are_checked_before_the_cold_start_runs(tmp_path, field, value, message):
    """A wrong loss setting used to surface after the whole cold start, as a traceback."""
    from configs import default
    from grpo_jax.run import pipeline

    c = default.get_config()
    c.workdir = str(tmp_path / "run")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        pipeline.run(c)
    assert not os.path.exists(tmp_path / "run" / "cold_start")  # nothing ran


VARIANTS = {"calculator": ["no_tool"], "smollm2_calculator": ["no_tool"], "torl_qwen": ["gsm8k"],
            "smollm2_lora_vs_full": ["lora"], "qwen3_8b": ["lora"]}


def test_every_shipped_config_passes_the_checks():
    """Each file in configs/ (and its named variants) stops no run at the check before any work."""
    import glob
    import importlib

    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
    names = [n for n in names if n != "__init__"]
    assert {"default", "smollm2_calculator", "torl_qwen"} <= set(names)
    for name in names:
        module = importlib.import_module(f"configs.{name}")
        for arg in [None] + VARIANTS.get(name, []):
            config.check(module.get_config() if arg is None else module.get_config(arg))
