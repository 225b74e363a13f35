"""Checkpoints that can be trusted: every save records its files' checksums inside orbax's atomic
commit; a damaged or unfinished checkpoint is named and the newest intact one is used; a save that
cannot be written says why in one line and leaves nothing behind; the KL reference is not stored."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh

from grpo_jax.common import metrics
from grpo_jax.rl import train_state
from grpo_jax.run import checkpoint
import short_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def _state(step: int, ref: bool = False) -> train_state.TrainState:
    """A small train state whose values differ from step to step (random: they do not compress)."""
    params = {"w": jax.random.normal(jax.random.key(step), (64, 256)), "b": jnp.full((256,), float(step))}
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = train_state.create(params, optax.adam(1e-3), mesh, seed=step, data={"epoch": 0, "position": step, "seed": 0},
                               ref_params=jax.tree.map(lambda x: x * 0 + 7, params) if ref else None)
    return state.replace(step=state.step + step)


def _saved(tmp_path, steps=(2, 4, 6), **kw) -> dict[int, train_state.TrainState]:
    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=5, **kw)
    states = {s: _state(s) for s in steps}
    for s in steps:
        ckpt.save(states[s])
    ckpt.close()
    return states


def _biggest_file(step_dir) -> str:
    return max(glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True), key=os.path.getsize)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


DAMAGE = {
    "bytes flipped": lambda d: _flip(_biggest_file(d)),
    "truncated file": lambda d: os.truncate(_biggest_file(d), os.path.getsize(_biggest_file(d)) // 2),
    "missing file": lambda d: os.remove(_biggest_file(d)),
    "missing item": lambda d: __import__("shutil").rmtree(os.path.join(d, "state")),
    "empty step folder": lambda d: [__import__("shutil").rmtree(os.path.join(d, x)) if os.path.isdir(os.path.join(d, x))
                                    else os.remove(os.path.join(d, x)) for x in os.listdir(d)],
    "unreadable manifest": lambda d: open(os.path.join(d, checkpoint.MANIFEST), "w").write("{"),
    "missing manifest": lambda d: os.remove(os.path.join(d, checkpoint.MANIFEST)),
}
SAID = {"bytes flipped": "SHA-256 of params/", "truncated file": "bytes, ", "missing file": "is missing",
        "missing item": "state/", "empty step folder": "has no manifest.json",
        "unreadable manifest": "manifest is unreadable", "missing manifest": "has no manifest.json"}


@pytest.mark.parametrize("asynchronous", [True, False])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage, asynchronous):
    states = _saved(tmp_path, asynchronous=asynchronous)
    ckpt_dir = checkpoint.directory(str(tmp_path))
    assert all(os.path.exists(os.path.join(ckpt_dir, str(s), checkpoint.MANIFEST)) for s in states)
    DAMAGE[damage](os.path.join(ckpt_dir, "6"))
    said = []
    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=5, asynchronous=asynchronous, say=said.append)
    back = ckpt.restore(jax.tree.map(jnp.zeros_like, states[6]))
    assert int(back.step) == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), jax.device_get(states[4]))
    (line,) = said
    assert f"checkpoint 6 in {ckpt_dir} is damaged" in line and SAID[damage] in line and "resuming from checkpoint 4" in line
    # Set aside, not deleted: step 6 can be saved again (orbax refuses a step that exists).
    assert os.listdir(os.path.join(str(tmp_path), "checkpoints_damaged")) == ["6"]
    ckpt.save(states[6])
    ckpt.close()
    assert checkpoint.problem(os.path.join(ckpt_dir, "6")) is None


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path):
    _saved(tmp_path, steps=(2, 4))
    ckpt_dir = checkpoint.directory(str(tmp_path))
    _flip(_biggest_file(os.path.join(ckpt_dir, "4")))
    os.remove(_biggest_file(os.path.join(ckpt_dir, "2")))
    ckpt = checkpoint.Checkpoints(str(tmp_path), say=lambda line: None)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint 4 .* damaged .*checkpoint 2 .* damaged .*no intact"):
        ckpt.restore(_state(0))
    ckpt.close()
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]  # nothing moved when nothing can be used


def test_an_unfinished_save_is_said_and_removed(tmp_path):
    states = _saved(tmp_path, steps=(2,))
    ckpt_dir = checkpoint.directory(str(tmp_path))
    # What kill -9 in the middle of orbax's write of step 4 leaves: its temporary folder.
    os.makedirs(os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp", "params"))
    said = []
    ckpt = checkpoint.Checkpoints(str(tmp_path), say=said.append)
    assert said == [f"checkpoint 4 in {ckpt_dir} was never finished (the run stopped while writing it): removed"]
    assert int(ckpt.restore(states[2]).step) == 2
    ckpt.close()
    assert os.listdir(ckpt_dir) == ["2"]


def test_an_async_save_keeps_the_values_of_a_state_donated_right_after(tmp_path):
    state = _state(3)
    expected = jax.device_get(state)
    ckpt = checkpoint.Checkpoints(str(tmp_path), asynchronous=True)
    ckpt.save(state)
    # The next update donates the state's buffers (overwritten in place where XLA can) while orbax
    # may still be writing in the background.
    after = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda x: x + 1, s.params)), donate_argnums=0)(state)
    back = ckpt.restore(jax.tree.map(jnp.zeros_like, after))
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), expected)


def test_the_reference_is_recorded_not_stored_and_a_changed_one_is_refused(tmp_path):
    state = _state(2, ref=True)
    recorded = {"source": "runs/a", "fingerprint": "0123abcd"}
    ckpt = checkpoint.Checkpoints(str(tmp_path), reference=recorded)
    ckpt.save(state)
    ckpt.close()
    like = jax.tree.map(jnp.zeros_like, state).replace(ref_params=state.ref_params)  # rebuilt by the run
    ckpt = checkpoint.Checkpoints(str(tmp_path), reference=recorded)
    assert set(ckpt.manager.item_metadata(2)["state"]) == {"step", "opt_state", "rng", "data"}
    back = ckpt.restore(like)
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), jax.device_get(state))
    other = checkpoint.Checkpoints(str(tmp_path), reference={"source": "runs/b", "fingerprint": "ffff0000"})
    with pytest.raises(ValueError, match="KL reference 'runs/a' .*0123abcd.* rebuilt its reference from 'runs/b'"):
        other.restore(like)
    other.close()


def test_a_checkpoint_without_a_manifest_is_never_restored(tmp_path):
    # What an older grpo_jax wrote: no manifest, the KL reference stored inside `state`.
    state = _state(5, ref=True)
    params, rest = train_state.to_items(state)
    with ocp.CheckpointManager(checkpoint.directory(str(tmp_path))) as old:
        old.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(
            {**rest, "ref_params": state.ref_params})))
    ckpt = checkpoint.Checkpoints(str(tmp_path), say=lambda line: None)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint 5 .* has no manifest.json .*--config.init_from"):
        ckpt.restore(jax.tree.map(jnp.zeros_like, _state(5)))
    ckpt.close()
    with pytest.raises(checkpoint.CheckpointError, match="has no manifest.json"):
        checkpoint.restore_params(str(tmp_path), params)


# -- the same faults met by scripts/train.py -----------------------------------------------------

def _train(workdir, *extra, before: str = ""):
    """scripts/train.py in a subprocess, after the Python statements `before` (a fault to provoke)."""
    run = f"{before}\nimport runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    cmd = [sys.executable, "-c", run, *short_run.command(workdir, *extra)[1:]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_resumes_from_the_newest_intact_checkpoint_and_repeats_the_steps_exactly(tmp_path, short_run_dir):
    workdir = short_run.copy(short_run_dir, tmp_path / "run")  # 8 steps, checkpoints 4, 6 and 8
    assert sorted(os.listdir(checkpoint.directory(workdir)), key=int) == ["4", "6", "8"]
    for step in (8, 6):
        _flip(_biggest_file(os.path.join(checkpoint.directory(workdir), str(step))))
    resumed = _train(workdir, "--config.resume=True")
    assert resumed.returncode == 0, resumed.stderr
    for step in (8, 6):
        assert f"checkpoint {step} in" in resumed.stdout
    assert resumed.stdout.count("is damaged (the SHA-256 of params/") == 2, resumed.stdout
    assert "resumed from step 4" in resumed.stdout
    # Steps 5 to 8 ran twice (the event file keeps both): the resumed run repeats them bit for bit.
    scalars = metrics.read_scalars(os.path.join(workdir, "tb"))
    for key in ("loss", "reward", "grad_norm"):
        steps = [s for s, _ in scalars[key]]
        assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8], key
        assert scalars[key][4:8] == scalars[key][8:12], key


# Writes past the limit fail with EFBIG ("File too large"), as they would on a full disk.
FILE_SIZE_LIMIT = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))")


def test_a_save_that_cannot_be_written_stops_in_one_line_and_leaves_nothing_behind(tmp_path, short_run_dir):
    workdir = short_run.copy(short_run_dir, tmp_path / "run")  # 8 steps, checkpoints 4, 6 and 8
    # Parameter files are ~2 MB: every later save fails part-way, as on a full disk.
    out = _train(workdir, "--config.steps=10", "--config.resume=True", before=FILE_SIZE_LIMIT)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("checkpoint 10 could not be written to ")
    assert "File too large" in out.stderr and "the earlier checkpoints are intact" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    ckpt_dir = checkpoint.directory(workdir)
    assert sorted(os.listdir(ckpt_dir), key=int) == ["4", "6", "8"]
    assert all(checkpoint.problem(os.path.join(ckpt_dir, s)) is None for s in ("4", "6", "8"))


def test_a_synchronous_save_that_fails_part_way_raises_one_line_and_removes_its_files(tmp_path):
    import resource
    import signal

    ckpt = checkpoint.Checkpoints(str(tmp_path), asynchronous=False, say=lambda line: None)
    ckpt.save(_state(2))
    big = _state(4).replace(params={"w": jax.random.normal(jax.random.key(1), (1024, 1024)), "b": jnp.zeros(256)})
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limits[1]))  # the 4 MB parameter file cannot be written
    try:
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint 4 could not be written .*\(File too large; "):
            ckpt.save(big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
        ckpt.close()
    assert os.listdir(checkpoint.directory(str(tmp_path))) == ["2"]


def test_a_save_larger_than_the_free_space_is_refused_before_writing(tmp_path):
    full_disk = ("import collections, shutil; usage = collections.namedtuple('usage', 'total used free'); "
                 "shutil.disk_usage = lambda path: usage(10**12, 10**12 - 10**5, 10**5)")
    out = _train(tmp_path, "--config.steps=2", before=full_disk)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("checkpoint 2 needs about ")
    assert "has 0.1 MB free" in out.stderr and "Traceback" not in out.stderr
    assert os.listdir(checkpoint.directory(str(tmp_path))) == []


def test_taking_the_parameters_verifies_the_files_it_reads_only(tmp_path):
    """restore_params reads the parameters (and a LoRA run's base record): damage in the optimizer
    state does not stop it, while a resume, which reads both, falls back to the intact checkpoint."""
    states = _saved(tmp_path, steps=(2, 4))
    ckpt_dir = checkpoint.directory(str(tmp_path))
    state_files = glob.glob(os.path.join(ckpt_dir, "4", "state", "**", "*"), recursive=True)
    _flip(max((f for f in state_files if os.path.isfile(f)), key=os.path.getsize))
    assert "state/" in checkpoint.problem(os.path.join(ckpt_dir, "4"))
    assert checkpoint.problem(os.path.join(ckpt_dir, "4"), items=("params", "base")) is None
    said = []
    params, step = checkpoint.restore_params(str(tmp_path), jax.tree.map(jnp.zeros_like, states[4].params), say=said.append)
    assert step == 4 and not said
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(states[4].params))
    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=5, say=said.append)
    assert int(ckpt.restore(jax.tree.map(jnp.zeros_like, states[4])).step) == 2
    ckpt.close()
    _flip(_biggest_file(os.path.join(str(tmp_path), "checkpoints_damaged", "4")))  # params too: now it is refused
    assert "params/" in checkpoint.problem(os.path.join(str(tmp_path), "checkpoints_damaged", "4"), items=("params",))


BLOCK = 1024


def _flip_block(path, index, block_bytes):
    with open(path, "r+b") as f:
        f.seek(index * block_bytes + 7)
        byte = f.read(1)
        f.seek(index * block_bytes + 7)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_large_checkpoint_is_spot_checked_by_blocks_and_read_whole_by_the_verify_command(tmp_path, monkeypatch):
    """Above checkpoint.verify_gb a restore checks every size and reads the first and last block of
    every file plus random others up to the bound; scripts/verify_checkpoint.py reads every block."""
    monkeypatch.setattr(checkpoint, "BLOCK_BYTES", BLOCK)  # so that a small state has many blocks
    _saved(tmp_path, steps=(2,))
    step_dir = os.path.join(checkpoint.directory(str(tmp_path)), "2")
    manifest = json.load(open(os.path.join(step_dir, checkpoint.MANIFEST)))
    big = _biggest_file(step_dir)
    blocks = manifest["files"][os.path.relpath(big, step_dir)][1]
    assert manifest["block_bytes"] == BLOCK and len(blocks) == -(-os.path.getsize(big) // BLOCK) >= 32
    for i, digest in enumerate(blocks):  # each block's own SHA-256
        with open(big, "rb") as f:
            f.seek(i * BLOCK)
            assert hashlib.sha256(f.read(BLOCK)).hexdigest() == digest

    read, check = [], checkpoint._check_block
    monkeypatch.setattr(checkpoint, "_check_block", lambda p, i, *a: read.append((os.fspath(p), i)) or check(p, i, *a))
    total_blocks = sum(len(d) for _, d in manifest["files"].values())
    ends = sum(min(len(d), 2) for _, d in manifest["files"].values())
    assert (ends + 5) * BLOCK < checkpoint.manifest_bytes(step_dir)
    assert checkpoint.problem(step_dir, read_bytes=(ends + 5) * BLOCK) is None
    assert len(read) == ends + 5 < total_blocks and len(set(read)) == len(read)
    assert {(big, 0), (big, len(blocks) - 1)} <= set(read)
    read.clear()
    assert checkpoint.problem(step_dir) is None and len(read) == total_blocks  # unbounded: every block

    # A damaged middle block: found by the full check and the command, named by block.
    middle = len(blocks) // 2
    _flip_block(big, middle, BLOCK)
    why = checkpoint.problem(step_dir)
    assert f"(its block {middle}, from byte {middle * BLOCK})" in why and "SHA-256 of params/" in why
    assert checkpoint.problem(step_dir, read_bytes=total_blocks * BLOCK) == why  # a bound above the size: all
    out = subprocess.run([sys.executable, "scripts/verify_checkpoint.py", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and f"checkpoints/2: DAMAGED: {why}" in out.stdout, out.stdout + out.stderr
    _flip_block(big, middle, BLOCK)  # repaired
    # The last block and a truncation are found however small the bound.
    _flip_block(big, len(blocks) - 1, BLOCK)
    assert f"its block {len(blocks) - 1}," in checkpoint.problem(step_dir, read_bytes=0)
    _flip_block(big, len(blocks) - 1, BLOCK)
    out = subprocess.run([sys.executable, "scripts/verify_checkpoint.py", str(tmp_path), "--step=2"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "checkpoints/2: intact" in out.stdout, out.stdout + out.stderr
    os.truncate(big, os.path.getsize(big) - 1)
    assert "bytes, " in checkpoint.problem(step_dir, read_bytes=0)


def test_a_manifest_of_whole_file_digests_is_still_verified(tmp_path):
    """Checkpoints written before block digests record one SHA-256 per file: still read and checked."""
    _saved(tmp_path, steps=(2,))
    step_dir = os.path.join(checkpoint.directory(str(tmp_path)), "2")
    path = os.path.join(step_dir, checkpoint.MANIFEST)
    manifest = json.load(open(path))
    for rel in manifest["files"]:
        with open(os.path.join(step_dir, rel), "rb") as f:
            manifest["files"][rel] = [os.path.getsize(os.path.join(step_dir, rel)), hashlib.file_digest(f, "sha256").hexdigest()]
    del manifest["format"], manifest["block_bytes"]
    json.dump(manifest, open(path, "w"))
    assert checkpoint.problem(step_dir) is None and checkpoint.problem(step_dir, read_bytes=0) is None
    _flip(_biggest_file(step_dir))
    assert "SHA-256 of params/" in checkpoint.problem(step_dir, read_bytes=0)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_retention_keeps_the_newest_verified_checkpoint_when_a_newer_one_fails(tmp_path, monkeypatch, asynchronous):
    """With checkpoint.keep=1 the previous checkpoint goes only once the new one is verified (its
    manifest written inside the commit): a save that fails before that leaves the previous one intact."""
    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=1, asynchronous=asynchronous)
    ckpt.save(_state(2))
    ckpt.wait()
    monkeypatch.setattr(checkpoint, "write_manifest", lambda *a: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint 4 could not be written"):
        ckpt.save(_state(4))
        ckpt.wait()
    ckpt.close(quiet=True)
    ckpt_dir = checkpoint.directory(str(tmp_path))
    assert sorted(os.listdir(ckpt_dir)) == ["2"] and checkpoint.problem(os.path.join(ckpt_dir, "2")) is None
    monkeypatch.undo()
    ckpt = checkpoint.Checkpoints(str(tmp_path), keep=1, asynchronous=asynchronous)
    ckpt.save(_state(6))  # verified: now the previous one goes
    ckpt.close()
    assert sorted(os.listdir(ckpt_dir)) == ["6"]
