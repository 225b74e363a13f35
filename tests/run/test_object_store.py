"""A workdir on an object store (tests/object_store.py's testfs://, standing in for gs://): every
file of a run and of a pipeline goes through epath, nothing lands in a local folder named after the
scheme, and a run resumes from it as from a local disk."""

import json
import os

import pytest
import object_store
from test_pipeline import two_stage
from test_trainer import tiny_config

from grpo_jax.common import storage
from grpo_jax.common.metrics import read_scalars
from grpo_jax.run import checkpoint
from grpo_jax.run import config
from grpo_jax.run import pipeline
from grpo_jax.run import trainer
from grpo_jax.run import workdir_lock


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """testfs:// mounted on tmp_path/bucket, run from tmp_path/cwd (checked empty afterwards)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with object_store.mounted(tmp_path / "bucket") as root:
        yield root
    assert os.listdir(tmp_path / "cwd") == [], "a URI was taken for a local path"


def test_paths_keep_uris_and_refuse_unknown_schemes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("gs://bucket/run")) == "gs://bucket/run"
    assert str(checkpoint.directory("gs://bucket/run")) == "gs://bucket/run/checkpoints"
    assert str(storage.path("runs/x")) == str(tmp_path / "runs" / "x")
    c = tiny_config("nosuch://bucket/run")
    with pytest.raises(config.ConfigError, match=r"workdir: 'nosuch://bucket/run': epath knows no filesystem for nosuch://"):
        config.check(c)


def test_a_run_writes_resumes_and_locks_through_epath(bucket):
    cfg = tiny_config("testfs://run", steps=2)
    cfg.eval.every = 0
    with trainer.Trainer(cfg) as tr:
        assert tr.workdir == "testfs://run"
        # The lock is a lease on an object store: a second run is refused while it is fresh.
        with pytest.raises(workdir_lock.WorkdirBusy, match=r"testfs://run is in use by pid \d+ .*lease was renewed"):
            workdir_lock.WorkdirLock("testfs://run").acquire()
        tr.run()
    assert not os.path.exists(os.path.join(bucket, "run", ".lock"))  # released
    step_dir = os.path.join(bucket, "run", "checkpoints", "2")
    manifest = json.load(open(os.path.join(step_dir, checkpoint.MANIFEST)))
    assert manifest["format"] == 2 and any(k.startswith("params/") for k in manifest["files"])
    assert checkpoint.problem("testfs://run/checkpoints/2") is None
    assert json.load(open(os.path.join(bucket, "run", "config.json")))["workdir"] == "testfs://run"
    assert [s for s, _ in read_scalars("testfs://run/tb")["reward"]] == [1, 2]

    cfg.steps = 3
    with trainer.Trainer(cfg) as tr:
        assert tr.restore() and tr.step == 2  # from the object store's checkpoint
        tr.run()
    assert sorted(os.listdir(os.path.join(bucket, "run", "checkpoints"))) == ["2", "3"]


def test_a_pipeline_resumes_between_stages_from_its_markers(bucket, capsys):
    c = two_stage("testfs://pipe")
    pipeline.run_pipeline(c, until_stage="sft")
    assert json.load(open(os.path.join(bucket, "pipe", "sft", "stage.json")))["name"] == "sft"
    out = pipeline.run_pipeline(two_stage("testfs://pipe"))  # the grpo stage starts from sft's checkpoint
    assert "stage sft: finished earlier, skipped" in capsys.readouterr().out
    assert [r["name"] for r in out] == ["sft", "grpo"]
    assert os.path.exists(os.path.join(bucket, "pipe", "grpo", "stage.json"))


def test_an_object_store_lock_is_a_lease_taken_over_once_stale(bucket, monkeypatch):
    lock = workdir_lock.WorkdirLock("testfs://leased").acquire()
    path = os.path.join(bucket, "leased", ".lock")
    held = json.load(open(path))
    monkeypatch.setattr(workdir_lock.time, "time", lambda: held["renewed"] + 0.5 * workdir_lock.LEASE_S)
    lock.refresh()
    assert json.load(open(path))["renewed"] == held["renewed"] + 0.5 * workdir_lock.LEASE_S  # renewed
    with pytest.raises(workdir_lock.WorkdirBusy, match="renewed 0 s ago"):
        workdir_lock.WorkdirLock("testfs://leased").acquire()
    # Not renewed for LEASE_S (its run was killed): the next run takes it over; the old holder's
    # release then leaves the new lease alone.
    monkeypatch.setattr(workdir_lock.time, "time", lambda: held["renewed"] + 1.6 * workdir_lock.LEASE_S)
    other = workdir_lock.WorkdirLock("testfs://leased").acquire()
    lock.release()
    assert json.load(open(path))["token"] == other._lease["token"]
    other.release()
    assert not os.path.exists(path)
