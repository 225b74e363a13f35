"""Two processes with two CPU devices each (jax.distributed over gloo): rows of a global batch reach
the devices that own them even when the mesh interleaves the hosts' devices, as a topology-aware
TPU mesh may."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

# Under pytest-xdist (-n 2 --dist loadgroup) these run on one worker: they bind a free port for JAX's coordinator.
pytestmark = pytest.mark.xdist_group("ports")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
    import numpy as np
    from grpo_jax.models import architecture
    from grpo_jax.models import placement
    from grpo_jax.parallel import multihost
    from grpo_jax.parallel import partitioning
    from grpo_jax.rl import loss
    from grpo_jax.rollout import sampler
    host = jax.process_index()
    d = jax.devices()
    assert [x.process_index for x in d] == [0, 0, 1, 1], d
    # Over the data centre network: data splits over the hosts (dcn_data), each host's devices together.
    dcn = partitioning.make_mesh(4, 1, 1, dcn_data=2)
    assert [[x.process_index for x in row.ravel()] for row in dcn.devices] == [[0], [0], [1], [1]], dcn.devices
    try:
        partitioning.make_mesh(4, 1, 1, dcn_data=4)
        raise AssertionError("4 granules of 2 hosts")
    except ValueError as e:
        assert "form 2 hosts" in str(e), e
    mesh = partitioning.make_mesh(4, 1, 1, devices=[d[0], d[2], d[1], d[3]])  # hosts interleaved
    mine = np.arange(4) + 10 * host  # host 0 holds rows 0..3 of the global batch, host 1 rows 4..7
    g = multihost.global_rows(mine, mesh)
    for shard in g.addressable_shards:  # every device holds the rows at its own global index
        start = shard.index[0].start
        want = np.concatenate([np.arange(4), np.arange(4) + 10])[start:start + shard.data.shape[0]]
        assert np.array_equal(np.asarray(shard.data), want), (shard.device, shard.index, shard.data)
    assert np.array_equal(multihost.local_rows(g), mine)
    # Advantages scaled by the batch std use every host's rewards, not each host's own.
    rewards = np.array([0.0, 1.0, 0.0, 1.0]) if host == 0 else np.array([0.0, 5.0, 0.0, 5.0])
    everyone = multihost.all_hosts(rewards)
    adv, _ = loss.compute_advantages(everyone, 2, loss.LossConfig(scale_rewards="batch"))
    assert abs(float(np.asarray(adv)[1]) - 0.5 / (np.std(everyone) + 1e-4)) < 1e-5
    # A rollout: each host's prompts become its block of rows, whatever the device order.
    cfg = architecture.SHAPES["tiny"]
    params = placement.init_params(cfg, mesh, jax.random.key(0))
    prompts = [[5 + host, 7], [9, 11 + host, 13]]
    sc = sampler.SamplingConfig(max_new_tokens=3, greedy=True, prompt_buckets=(4,))
    r = sampler.sample(params, cfg, prompts, 2, sc, jax.random.key(0), mesh=mesh)
    ids, mask = multihost.local_rows(r.prompt_ids), multihost.local_rows(r.prompt_mask)
    assert [list(ids[i][mask[i]]) for i in range(0, 4, 2)] == prompts, ids
    print("OK", host)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_global_rows_follow_device_indices_not_process_order():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-2000:] + err[-4000:]


GRPO_WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
    sys.path.insert(0, "tests")
    import numpy as np
    from grpo_jax.common import data
    from grpo_jax.parallel import multihost
    from grpo_jax.rewards import scoring
    from grpo_jax.rl import grpo
    from grpo_jax.rl import train_state
    from grpo_jax.run import loading
    from test_dynamic_sampling import odd_first_operand
    from test_trainer import tiny_config
    cfg = tiny_config(sys.argv[3])
    cfg.grpo.prompts_per_step, cfg.grpo.dynamic_sampling, cfg.grpo.max_sampling_rounds = 4, True, 6
    cfg.grpo.num_iterations = 2  # the trainer's old log-probabilities, over both hosts' rows
    pol, _ = loading.load(cfg)
    task = data.load_task(cfg.data, cfg.seed)
    scorer = scoring.Scorer(cfg.data.prompt_field, cfg.sampling.max_new_tokens, workers=-1,
                            fns={"math": odd_first_operand})
    algo = grpo.GRPO.from_config(cfg, pol.replace(params=None), scorer, task)
    state = train_state.create(pol.params, algo.tx, pol.mesh, seed=1, data=algo.initial_data(),
                               ref_params=algo.reference_params(pol.params))
    for _ in range(2):
        state, m = algo.step(state)
        # Every host sampled as many rounds, and every group of the global batch has signal.
        rounds = multihost.all_hosts(np.asarray([m["dynamic_sampling/rounds"]]))
        assert rounds[0] == rounds[1] and m["frac_reward_zero_std"] == 0.0, (rounds, m)
        assert m["update_skipped"] == 0.0 and m["update_nonfinite"] == 0.0, m
    print("OK", jax.process_index(), int(state.data["position"]))
""")


def test_grpo_steps_with_dynamic_sampling_on_two_hosts(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", GRPO_WORKER, str(i), port, str(tmp_path / "run")], env=env,
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-2000:] + err[-4000:]


MULTI_TURN_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
    sys.path.insert(0, "tests")
    import numpy as np
    from grpo_jax.parallel import multihost
    from grpo_jax.parallel import partitioning
    from test_tool_environments import episodes_on
    mesh = partitioning.make_mesh(data=2, fsdp=4)
    rollout, stats = episodes_on(mesh, jax.process_index(), 2)
    out = {k: multihost.local_rows(getattr(rollout, k)).tolist() for k in ("tokens", "sampled", "lengths", "truncated")}
    out["logprobs"] = multihost.local_rows(rollout.logprobs).tolist()
    out.update(calls=stats.calls.tolist(), environment=stats.states, violations=stats.prefix_violations)
    print("RESULT", json.dumps(out))
""")


@pytest.mark.slow  # 100 s of CPU: two processes compile the rollout beside a third
def test_multi_turn_episodes_on_two_hosts_equal_one_host():
    """Two processes of 4 devices, a 2x4 mesh: each host runs its own episodes' calls (an environment
    per episode, reset from its rows); the rollout equals one device's."""
    import json

    import jax
    import numpy as np

    from test_tool_environments import episodes_on

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "rollout")])}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", MULTI_TURN_WORKER, str(i), port], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    want, stats = episodes_on(None, 0, 1)  # meanwhile, every prompt on one device here
    outs = [p.communicate(timeout=600) for p in procs]
    got = []
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and "RESULT" in out, out[-2000:] + err[-4000:]
        got.append(json.loads(out.split("RESULT", 1)[1]))
    assert stats.calls.sum() >= 4 and all(g["violations"] == 0 for g in got)
    for k in ("tokens", "sampled", "lengths", "truncated"):
        np.testing.assert_array_equal(np.concatenate([np.asarray(g[k]) for g in got]), np.asarray(getattr(want, k)), k)
    np.testing.assert_allclose(np.concatenate([np.asarray(g["logprobs"]) for g in got]), np.asarray(want.logprobs), atol=1e-5)
    assert [c for g in got for c in g["calls"]] == stats.calls.tolist()
    assert [e for g in got for e in g["environment"]] == stats.states  # each host reset its own rows' counters
