"""The memory plan: per-device bytes of a run's update, reference and rollout from their programs
compiled ahead of time, before any weight loads; a run that does not fit stops with what to change."""

import jax
import pytest

from configs import base
from grpo_jax.models import architecture
from grpo_jax.parallel import partitioning
from grpo_jax.run import config
from grpo_jax.run import loading
from grpo_jax.run import memory_plan
from grpo_jax.run import trainer
from test_trainer import tiny_config


def _cfg(**grpo):
    c = base.get_config()
    c.grpo.prompts_per_step, c.grpo.num_generations, c.sampling.max_new_tokens = 4, 4, 64
    c.grpo.beta = 0.04
    for k, v in grpo.items():
        setattr(c.grpo, k, v)
    return c


def test_the_plan_holds_the_state_the_kv_cache_and_shrinks_with_micro_batches():
    model = architecture.SHAPES["tiny"]
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    plan = memory_plan.estimate(_cfg(), model, mesh, prompt_len=64)
    assert set(plan.phases) == {"update", "reference", "rollout"}
    params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: __import__(
        "grpo_jax.models.transformer", fromlist=["x"]).param_shapes(model)))) * 4
    assert plan.resident["parameters"] == params and plan.resident["optimizer state"] >= 2 * params
    assert plan.resident["reference weights"] == params  # float32 compute: the reference's copy is as large
    kv = 2 * model.num_layers * 16 * (64 + 64) * model.num_kv_heads * model.head_dim * 4  # k and v, 16 rows
    assert plan.programs["rollout"] >= kv and plan.phases["rollout"] >= kv + sum(plan.resident.values())
    assert plan.phases["update"] >= plan.programs["update"] >= params * 4  # parameters, gradients, AdamW
    assert plan.peak == max(plan.phases.values())
    halves = memory_plan.estimate(_cfg(microbatches=2), model, mesh, prompt_len=64)
    assert halves.programs["update"] < plan.programs["update"]  # activations are per micro-batch
    # LoRA: no AdamW state of the base, which is the reference (no copy of its own)
    lora = memory_plan.estimate(_cfg(), model.replace(lora_rank=4), mesh, prompt_len=64)
    assert lora.resident["optimizer state"] < plan.resident["optimizer state"] / 10
    assert lora.resident["reference weights"] == 0 and lora.resident["frozen base"] > 0


def test_a_plan_that_does_not_fit_names_the_phase_and_what_to_change():
    model = architecture.SHAPES["tiny"]
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    plan = memory_plan.estimate(_cfg(), model, mesh, prompt_len=64)
    plan.limit = plan.peak + 1
    memory_plan.check(_cfg(), model, plan)  # fits: nothing said
    plan.limit = plan.peak // 2
    with pytest.raises(config.ConfigError, match=rf"memory plan: the {plan.worst} phase needs .* per device and the "
                                                 r"device has .*\(before any weight was loaded\)") as e:
        memory_plan.check(_cfg(), model, plan)
    assert "| update phase" in str(e.value) and "Try: " in str(e.value)
    assert any(s.startswith("grpo.microbatches=2") or s.startswith("grpo.prompts_per_step=")
               for s in memory_plan.advice(_cfg(), model, plan))


def test_a_run_that_would_not_fit_stops_before_any_weight_loads(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path / "run")
    monkeypatch.setattr(memory_plan, "device_memory", lambda: 2**20)  # a 1 MiB device: "auto" plans
    monkeypatch.setattr(loading, "_source_params", lambda *a: pytest.fail("weights read before the plan"))
    with pytest.raises(config.ConfigError, match=r"memory plan: the \w+ phase needs .* the device has 1.0 MiB"):
        trainer.Trainer(cfg)
    assert "memory plan (1 devices" in capsys.readouterr().out
    monkeypatch.undo()
    cfg = tiny_config(tmp_path / "off")
    cfg.memory_plan = "off"  # and "auto" on a CPU, which reports no memory: no plan, nothing compiled for it
    trainer.Trainer(cfg).close()
    assert "memory plan" not in capsys.readouterr().out
