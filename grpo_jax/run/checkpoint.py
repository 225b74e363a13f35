"""Checkpoints of a train state (orbax), in WORKDIR/checkpoints/STEP, verified when read back.

Each checkpoint has these items, so that evaluation, export and the next stage of a pipeline can
read the parameters alone:

    params     the policy's parameters (a LoRA run's: its adapters)
    state      {"step", "opt_state", "rng", "data"}
    base       a LoRA run's {"source", "fingerprint"}: the frozen base the adapters belong to
    reference  when the KL term has a reference, {"source", "fingerprint"}: the reference itself is
               the starting policy, rebuilt by every run from its source, so it is not stored

and a file manifest.json: the size and SHA-256 of every file the save wrote. Orbax writes a save
into STEP.orbax-checkpoint-tmp and renames it to STEP when complete; the manifest is written inside
the temporary folder just before that rename, so a finished checkpoint always has one and a save
cut short (kill -9, a full disk) never looks finished. Reading a checkpoint back first checks every
file against its manifest; a damaged checkpoint (a flipped byte, a truncated or missing file) is
moved to WORKDIR/checkpoints_damaged and the newest intact one is used instead, with a message
naming both. A checkpoint without a manifest is damaged like any other: every finished save has one.

Saves are asynchronous by default (orbax): `save` returns once the state is copied to host memory,
and the files, their checksums and the rename happen in a background thread while training goes on.

    ckpt = Checkpoints(workdir, keep=3)
    ckpt.save(state); state = ckpt.restore(state)        # the target gives structure and shardings
    params, step = restore_params(other_workdir, abstract_params)
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from grpo_jax.parallel import multihost
from grpo_jax.rl import train_state

MANIFEST = "manifest.json"
# Orbax rewrites its step metadata when it commits, after the manifest is written; it holds no data.
_UNHASHED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for a save in progress
_ORBAX_DIR = os.path.dirname(os.path.dirname(ocp.__file__))


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or no intact checkpoint to resume from."""


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def damaged_directory(workdir_checkpoints: str) -> str:
    return os.path.join(os.path.dirname(workdir_checkpoints), "checkpoints_damaged")


def _target(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# --------------------------------------------------------------------------------------------------
# Manifests: what a save wrote, and whether it is still there


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(root: str) -> dict[str, list]:
    """{relative path: [bytes, sha256]} of every data file under `root` (hashed on threads: hashlib
    releases the GIL, so large checkpoints hash at the disk's speed)."""
    paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)
    paths = [p for p in paths if os.path.basename(p) not in _UNHASHED]
    with concurrent.futures.ThreadPoolExecutor(min(16, len(paths) or 1)) as pool:
        digests = list(pool.map(lambda p: _sha256(os.path.join(root, p)), paths))
    return {p: [os.path.getsize(os.path.join(root, p)), h] for p, h in zip(paths, digests)}


def write_manifest(root: str, step: int) -> None:
    manifest = {"step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": file_digests(root)}
    with open(os.path.join(root, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=0)
    os.replace(os.path.join(root, MANIFEST + ".tmp"), os.path.join(root, MANIFEST))


def problem(step_dir: str, items: tuple[str, ...] | None = None) -> str | None:
    """Why the checkpoint in `step_dir` cannot be trusted, or None when every file its manifest
    lists is there with its size and SHA-256; with `items`, only the files of those items (and the
    step's own top-level files) are checked: what a reader of only those items reads."""
    if not os.path.isdir(step_dir):
        return "its folder is missing"
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return (f"it has no {MANIFEST} (every checkpoint grpo_jax writes has one; one written by a grpo_jax "
                "from before checkpoints were verified is not read: start a new run from its parameters with "
                "--config.init_from=RUN_WORKDIR on that grpo_jax, or retrain)")
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"its manifest is unreadable: {e}"
    for rel, (size, digest) in files.items():
        if items is not None and "/" in rel and rel.split("/", 1)[0] not in items:
            continue
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
        if _sha256(full) != digest:
            return f"the SHA-256 of {rel} differs from the one recorded when it was written"
    return None


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


_SPACE = ("No space left on device", "File too large", "Disk quota exceeded")  # errors that more room fixes


def _short(e: BaseException) -> str:
    """An exception in one line: orbax and tensorstore errors run to hundreds of lines."""
    text = " ".join(str(e).split())
    for marker in (*_SPACE, "Permission denied", "Read-only file system"):
        if marker in text:
            return marker
    return f"{type(e).__name__}: {text[:300]}"


def _from_orbax(record: logging.LogRecord) -> bool:
    tb = record.exc_info[2] if record.exc_info else None
    files = [record.pathname] + [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)]
    return any(f.startswith(_ORBAX_DIR) for f in files)


class _OrbaxErrors(logging.Filter):
    """Keeps the latest exception orbax logged: it logs some failed saves instead of raising them."""

    def __init__(self):
        super().__init__()
        self.last: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and _from_orbax(record):
            self.last = record.exc_info[1]
        return True


def report_failed_saves_once() -> None:
    """For scripts: a save that fails part-way (a full disk) is reported by Checkpoints as one line,
    but orbax logs the error's traceback from each of its threads, its unfinished asyncio tasks log
    it again when collected, and tensorstore's remaining writes each report a RuntimeError from
    orbax's closed event loop (sys.unraisablehook). This drops those, and only those, from the
    root logger's handlers (after Checkpoints has read them) and from sys.unraisablehook."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not _from_orbax(record))
    hook = sys.unraisablehook

    def unraisablehook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)

    sys.unraisablehook = unraisablehook


# --------------------------------------------------------------------------------------------------
# Choosing the checkpoint to read


def _choose(manager: ocp.CheckpointManager, steps: list[int], items: tuple[str, ...] | None = None) -> tuple[int | None, list]:
    """The newest of `steps` (newest first) whose files (of `items`, default all) are intact, and
    the (step, why) of the damaged ones before it. Verified on process 0 only (every host reads the
    same files) and agreed by all."""
    chosen, damaged = -1, []
    if jax.process_index() == 0:
        for step in steps:
            why = problem(os.path.join(str(manager.directory), str(step)), items)
            if why is None:
                chosen = step
                break
            damaged.append((step, why))
    chosen = multihost.host_max([chosen])[0]
    return (None if chosen < 0 else chosen), damaged


def _set_aside(manager: ocp.CheckpointManager, damaged: list) -> str:
    """Move damaged checkpoints out of the way (a later save of the same step would collide);
    returns where to."""
    aside = damaged_directory(str(manager.directory))
    if damaged and jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for step, _ in damaged:
            dest = os.path.join(aside, str(step))
            if os.path.exists(dest):
                dest += time.strftime("-%Y%m%d-%H%M%S")
            shutil.move(os.path.join(str(manager.directory), str(step)), dest)
    if damaged:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("grpo_jax.run.checkpoint.set_aside")
        manager.reload()
    return aside


def _damage_report(manager: ocp.CheckpointManager, damaged: list) -> str:
    return "; ".join(f"checkpoint {s} in {manager.directory} is damaged ({why})" for s, why in damaged)


def _check_base(manager: ocp.CheckpointManager, step: int, fingerprint: str, source: str = "") -> None:
    """Stop unless checkpoint `step` records the base whose fingerprint is `fingerprint`."""
    recorded = _json_item(manager, step, "base")
    where = f"checkpoint {step} in {manager.directory}"
    if recorded is None:
        raise ValueError(f"{where} holds no LoRA adapters (it records no base model): it is a full fine-tune's; "
                         "set model.lora.rank=0 to read it, or start a LoRA run from it with init_from")
    if recorded["fingerprint"] != fingerprint:
        raise ValueError(f"{where} holds LoRA adapters of the base {recorded['source']!r} (fingerprint "
                         f"{recorded['fingerprint']}), but this run's base is {source or 'another'} (fingerprint "
                         f"{fingerprint}): adapters only mean something on the base they were trained on. Use that "
                         "base (model.source, init_from), or start a new workdir")


def _check_reference(manager: ocp.CheckpointManager, step: int, reference: dict[str, str]) -> None:
    """Stop unless the reference this run rebuilt is the one checkpoint `step` was trained against."""
    recorded = _json_item(manager, step, "reference")
    if recorded is not None and recorded["fingerprint"] != reference["fingerprint"]:
        raise ValueError(
            f"checkpoint {step} in {manager.directory} was trained against the KL reference {recorded['source']!r} "
            f"(fingerprint {recorded['fingerprint']}), but this run rebuilt its reference from {reference['source']!r} "
            f"(fingerprint {reference['fingerprint']}): the weights it starts from have changed since (init_from's "
            "run trained on, or model.source points elsewhere). Point them back at those weights, or start a new "
            "workdir")


def _json_item(manager: ocp.CheckpointManager, step: int, name: str) -> dict | None:
    if not os.path.isdir(os.path.join(str(manager.directory), str(step), name)):  # orbax: an item per folder
        return None
    return manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]


# --------------------------------------------------------------------------------------------------


class Checkpoints:
    """The checkpoints of one run; the latest `keep` are kept.

    Args:
      base: a LoRA run's {"source", "fingerprint"} of its frozen base, recorded in every save and
        checked on restore.
      reference: {"source", "fingerprint"} of the KL reference (when there is one), recorded in
        every save and checked on restore.
      asynchronous: write in the background (orbax); `wait` or `close` blocks until written.
        Holds a host copy of the state while it writes.
      say: where messages go (damaged or unfinished checkpoints found).
    """

    def __init__(self, workdir: str, keep: int = 3, base: dict[str, str] | None = None,
                 reference: dict[str, str] | None = None, asynchronous: bool = True,
                 say: Callable[[str], None] = print):
        self.base, self.reference, self.asynchronous, self.say = base, reference, asynchronous, say
        self.dir = directory(workdir)
        # Steps handed to orbax, oldest first, whose manifest is still due (process 0 only).
        self._writing: list[int] = []
        self._failed: CheckpointError | None = None
        self._orbax_errors = _OrbaxErrors()
        logging.getLogger("absl").addFilter(self._orbax_errors)  # orbax logs through absl
        if jax.process_index() == 0:
            unfinished = sorted(glob.glob(os.path.join(self.dir, f"*{_TMP}*")))
            for path in unfinished:  # orbax deletes them (cleanup_tmp_directories); say so
                say(f"checkpoint {os.path.basename(path).split('.')[0]} in {self.dir} was never finished (the run "
                    "stopped while writing it): removed")
        handlers = dict(params=ocp.StandardCheckpointHandler(), state=ocp.StandardCheckpointHandler(),
                        base=ocp.JsonCheckpointHandler(), reference=ocp.JsonCheckpointHandler())
        self.manager = ocp.CheckpointManager(self.dir, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest)))

    def _write_manifest(self) -> None:
        # Runs on the primary host in orbax's background thread, after every host's files are
        # written and before orbax renames STEP.orbax-checkpoint-tmp to STEP: the manifest is part
        # of the atomic commit. Saves are serialised, so the oldest pending step is this one.
        step = self._writing[0]
        pending = glob.glob(os.path.join(self.dir, f"{step}{_TMP}*"))
        write_manifest(pending[0] if pending else os.path.join(self.dir, str(step)), step)  # object stores: in place
        self._writing.pop(0)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _fail(self, step: int, e: BaseException) -> CheckpointError:
        """The save of `step` failed: remove what it wrote and say why in one line."""
        self._writing.clear()
        self._remove_unfinished()
        free = _size(shutil.disk_usage(self.dir).free) if os.path.isdir(self.dir) else "?"
        why = _short(e)
        fix = ("Free some space (or lower checkpoint.keep) and resume" if why in _SPACE else
               "Fix what the error names and resume")  # e.g. a barrier that timed out: not the disk
        self._failed = CheckpointError(
            f"checkpoint {step} could not be written to {self.dir} ({why}; {free} free there): its "
            f"partial files were removed and the earlier checkpoints are intact. {fix}")
        return self._failed

    def _remove_unfinished(self, settle_s: float = 0.0) -> None:
        """Remove unfinished saves' folders; for `settle_s` more seconds, again as they reappear
        (tensorstore finishes the writes orbax stopped waiting for, recreating their folders)."""
        if jax.process_index() != 0:
            return
        end = time.monotonic() + settle_s
        while True:
            for path in glob.glob(os.path.join(self.dir, f"*{_TMP}*")):
                shutil.rmtree(path, ignore_errors=True)
            if time.monotonic() >= end:
                return
            time.sleep(0.05)

    def save(self, state: train_state.TrainState) -> None:
        step = int(state.step)
        params, rest = train_state.to_items(state)
        nbytes = sum(x.nbytes for x in jax.tree.leaves((params, rest)))
        free = shutil.disk_usage(os.path.dirname(self.dir) or ".").free
        if nbytes > free:  # refused before writing anything: a half-written checkpoint helps no one
            raise CheckpointError(f"checkpoint {step} needs about {_size(nbytes)} but {self.dir} has {_size(free)} "
                                  "free: free some space (or lower checkpoint.keep) and resume")
        items = dict(params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(rest))
        for name, record in (("base", self.base), ("reference", self.reference)):
            if record is not None:
                items[name] = ocp.args.JsonSave(record)
        if jax.process_index() == 0:  # orbax runs the manifest callback on the primary host only
            self._writing.append(step)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - the previous save's error surfaces here too
            raise self._fail(step, e) from e
        if not saved:
            self._writing.clear()
            raise CheckpointError(f"orbax declined to save step {step} in {self.dir} (its latest is "
                                  f"{self.latest_step()})")
        if not self.asynchronous:
            self.wait()

    def wait(self) -> None:
        """Block until the saves in flight are written (their checksums and rename included)."""
        self._raise_failure(self.manager.wait_until_finished)

    def poll(self) -> CheckpointError | None:
        """The error of a save in the background that has failed, else None; never waits for one in
        flight and involves no other host (the trainer agrees with the others on what to do)."""
        if self.manager.is_saving_in_progress():
            return None
        try:
            self._raise_failure()
        except CheckpointError as e:
            return e
        return None

    def _raise_failure(self, wait: Callable[[], None] = lambda: None) -> None:
        try:
            wait()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._fail(self._writing[0] if self._writing else self.latest_step() or 0, e) from e
        if self._writing:  # orbax logged a failed save instead of raising it
            raise self._fail(self._writing[0], self._orbax_errors.last or RuntimeError("orbax did not finish the save"))

    def restore(self, like: train_state.TrainState, step: int | None = None) -> train_state.TrainState | None:
        """The newest intact checkpoint (or the one at `step`) in the structure, dtypes and shardings
        of `like`; None when there is none. Damaged ones are set aside, with a message."""
        self.wait()
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            return None
        chosen, damaged = _choose(self.manager, steps)
        if chosen is None:
            raise CheckpointError(_damage_report(self.manager, damaged) + ": no intact checkpoint to resume from. "
                                  f"Move {self.dir} away to start again from step 0")
        params, rest = train_state.to_items(like)
        if self.base is not None:
            _check_base(self.manager, chosen, self.base["fingerprint"], self.base["source"])
        if self.reference is not None:
            _check_reference(self.manager, chosen, self.reference)
        rest = _target(rest)
        try:
            out = self.manager.restore(chosen, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_target(params)), state=ocp.args.StandardRestore(rest)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {chosen} in {self.dir} does not match this run's train "
                             f"state (a different model, optimizer or LoRA setting, or another grpo_jax version's "
                             f"layout; its parameters can start a new run: --config.init_from=RUN_WORKDIR): "
                             f"{str(e)[:800]}") from e
        if damaged:
            aside = _set_aside(self.manager, damaged)
            self.say(f"{_damage_report(self.manager, damaged)}: moved to {aside}; resuming from checkpoint {chosen}")
        return train_state.from_items(out["params"], out["state"], ref_params=like.ref_params, frozen=like.frozen)

    def close(self, quiet: bool = False) -> None:
        """Wait for the saves in flight, then release orbax's threads. A save that failed was
        already reported: it is not raised a second time; `quiet`: nothing is (another error is
        on its way, or a second Ctrl-C cut the save short)."""
        try:
            if self._failed is None and not quiet:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - a failed save's error may surface again as orbax closes
                if not quiet and self._failed is None:
                    raise
            logging.getLogger("absl").removeFilter(self._orbax_errors)
            if self._failed is not None:  # tensorstore may have gone on writing after the failure
                self._remove_unfinished(settle_s=1.0)


def restore_params(workdir: str, like: Any, step: int | None = None, base: str | None = None,
                   say: Callable[[str], None] = print) -> tuple[Any, int]:
    """The parameters of run `workdir`'s newest intact checkpoint (or the one at `step`), restored
    in the structure and shardings of `like` (arrays or ShapeDtypeStructs); a LoRA run's adapters
    when `base`, the fingerprint of the base they must belong to, is given. Returns (params, step)."""
    path = directory(workdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False, read_only=True)) as manager:
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
        chosen, damaged = _choose(manager, steps, items=("params", "base"))  # the files it reads, not the optimizer's
        if chosen is None:
            raise CheckpointError(_damage_report(manager, damaged) + ": no intact checkpoint to take the parameters from")
        if damaged:
            say(_damage_report(manager, damaged) + f"; taking the parameters of checkpoint {chosen} instead")
        if base is not None:
            _check_base(manager, chosen, base)
        out = manager.restore(chosen, args=ocp.args.Composite(params=ocp.args.StandardRestore(_target(like))))
    return out["params"], chosen
