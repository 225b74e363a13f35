"""Checkpoints of a train state (orbax), in WORKDIR/checkpoints/STEP, verified when read back.

Each checkpoint has these items, so that evaluation, export and the next stage of a pipeline can
read the parameters alone:

    params     the policy's parameters (a LoRA run's: its adapters)
    state      {"step", "opt_state", "rng", "data"}
    base       a LoRA run's {"source", "fingerprint"}: the frozen base the adapters belong to
    reference  when the KL term has a reference, {"source", "fingerprint"}: the reference itself is
               the starting policy, rebuilt by every run from its source, so it is not stored

and a file manifest.json: the size and a SHA-256 per 16 MiB block of every file the save wrote.
Orbax writes a save into STEP.orbax-checkpoint-tmp and renames it to STEP when complete (on an
object store it writes in place and commits with a marker file); the manifest is written just
before that commit, so a finished checkpoint always has one and a save cut short (kill -9, a full
disk) never looks finished. On several hosts each hashes the files it wrote, in parallel, and the
primary host merges their shares. Reading a checkpoint back first checks its files against the
manifest: every file's size, and every block up to `verify_bytes` (checkpoint.verify_gb; a larger
state is spot-checked by the first and last block of each file and random others, and
scripts/verify_checkpoint.py reads every byte). A damaged checkpoint (a flipped byte, a truncated
or missing file) is moved to WORKDIR/checkpoints_damaged and the newest intact one is used
instead, with a message naming both. A checkpoint without a manifest is damaged like any other.

Saves are asynchronous by default (orbax): `save` returns once the state is copied to host memory,
and the files, their checksums and the rename happen in a background thread while training goes on.

    ckpt = Checkpoints(workdir, keep=3)
    ckpt.save(state); state = ckpt.restore(state)        # the target gives structure and shardings
    params, step = restore_params(other_workdir, abstract_params)
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import sys
import time
import traceback
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from grpo_jax.common import storage
from grpo_jax.parallel import multihost
from grpo_jax.rl import train_state

MANIFEST = "manifest.json"
# Orbax rewrites its step metadata when it commits, after the manifest is written; it holds no data.
_UNHASHED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
_PARTIAL = re.compile(r"manifest\.process_\d+\.json")  # a host's share of the manifest, merged into it
_HOST_FILE = re.compile(r"(?:^|/)(?:ocdbt\.)?process_(\d+)(?:/|$)")
_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for a save in progress
_TMP_NAME = re.compile(re.escape(_TMP) + r"[^/]*")
_ORBAX_DIR = os.path.dirname(os.path.dirname(ocp.__file__))
BLOCK_BYTES = 16 << 20  # manifests record a SHA-256 per block of a file, so a large state can be spot-checked
VERIFY_BYTES = 8e9  # read back at most this much of a checkpoint before resuming from it (checkpoint.verify_gb)


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or no intact checkpoint to resume from."""


def directory(workdir: str | os.PathLike) -> epath.Path:
    return storage.path(workdir) / "checkpoints"


def damaged_directory(workdir_checkpoints: str | os.PathLike) -> epath.Path:
    return storage.path(workdir_checkpoints).parent / "checkpoints_damaged"


def _target(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# --------------------------------------------------------------------------------------------------
# Manifests: what a save wrote, and whether it is still there


def _files(root: epath.Path) -> dict[str, str]:
    """{the path a data file under `root` will have once committed: its path now}. At a multi-host
    save's barrier an item's folder is still params.orbax-checkpoint-tmp (renamed to params when
    the primary host finalizes it)."""
    rels = (str((d / f).relative_to(root)) for d, _, files in root.walk() for f in files)
    return {_TMP_NAME.sub("", r): r for r in sorted(rels)
            if posixpath.basename(r) not in _UNHASHED and not _PARTIAL.fullmatch(r)}


def _host(rel: str) -> int | None:
    """The process that wrote file `rel` (orbax gives each one its own ocdbt.process_N folder and
    array_metadatas/process_N file), or None for the primary host's shared files."""
    m = _HOST_FILE.search(rel)
    return int(m.group(1)) if m else None


def _digest(p: epath.Path) -> list:
    """[bytes, [sha256 of each BLOCK_BYTES block]]: a large file can be spot-checked by blocks."""
    size, blocks = 0, []
    with p.open("rb") as f:
        while chunk := f.read(BLOCK_BYTES):
            size += len(chunk)
            blocks.append(hashlib.sha256(chunk).hexdigest())
    return [size, blocks]


def file_digests(root: str | os.PathLike, host: int | None | str = "all") -> dict[str, list]:
    """{relative path: [bytes, [sha256 per block]]} of the data files under `root`: all of them, or
    those process `host` wrote (None: the shared ones). Hashed on threads: hashlib releases the GIL,
    so a large checkpoint hashes at the disk's speed."""
    root = storage.path(root)
    files = {key: now for key, now in _files(root).items() if host == "all" or _host(key) == host}
    with concurrent.futures.ThreadPoolExecutor(min(16, len(files) or 1)) as pool:
        return dict(zip(files, pool.map(lambda now: _digest(root / now), files.values())))


def _partial(root: epath.Path, host: int) -> epath.Path:
    return root / f"manifest.process_{host}.json"


def write_partial_manifest(root: str | os.PathLike, host: int) -> None:
    """Each host's share of a manifest: the digests of the files it wrote, hashed by it (in parallel
    with the other hosts), for the primary host to merge."""
    storage.write_text(_partial(storage.path(root), host), json.dumps({"files": file_digests(root, host)}))


def write_manifest(root: str | os.PathLike, step: int, hosts: int = 1, own: dict | None = None) -> None:
    """Write ROOT/manifest.json: every file's size and block digests. With `hosts` > 1 the primary
    host merges the other hosts' partial manifests (and `own`, its own share) and hashes the shared
    files; a file no host reported is hashed here, so every file is covered."""
    root = storage.path(root)
    files = dict(own or {}) if hosts > 1 else file_digests(root)
    by = {"0": len(files)}
    for i in range(1, hosts):
        part = _partial(root, i)
        theirs = json.loads(part.read_text())["files"] if part.exists() else {}
        files.update(theirs)
        by[str(i)] = len(theirs)
        part.unlink(missing_ok=True)
    rest = {key: now for key, now in _files(root).items() if key not in files}  # shared, or not reported
    with concurrent.futures.ThreadPoolExecutor(min(16, len(rest) or 1)) as pool:
        files.update(zip(rest, pool.map(lambda now: _digest(root / now), rest.values())))
    by["0"] += len(rest)
    manifest = {"format": 2, "step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "block_bytes": BLOCK_BYTES, "hashed_by_process": by, "files": files}
    storage.write_text(root / MANIFEST, json.dumps(manifest, indent=0))


def _check_block(p: epath.Path, index: int, block_bytes: int, digest: str) -> bool:
    with p.open("rb") as f:
        f.seek(index * block_bytes)
        return hashlib.sha256(f.read(block_bytes)).hexdigest() == digest


def problem(step_dir: str | os.PathLike, items: tuple[str, ...] | None = None, read_bytes: float | None = None,
            rng: random.Random | None = None) -> str | None:
    """Why the checkpoint in `step_dir` cannot be trusted, or None when every file its manifest lists
    is there with its size and digests. With `items`, only the files of those items (and the step's
    own top-level files) are checked: what a reader of only those items reads.

    `read_bytes` bounds the bytes read back (None: every byte). Every file's size is always checked;
    a checkpoint larger than the bound is checked by the first and last block of each file and
    random other blocks up to it, so a 100 GB state is verified in seconds and a truncation, a
    missing file or a damaged block among those sampled is still found."""
    step_dir = storage.path(step_dir)
    if not step_dir.is_dir():
        return "its folder is missing"
    path = step_dir / MANIFEST
    if not path.exists():
        return (f"it has no {MANIFEST} (every checkpoint grpo_jax writes has one; one written by a grpo_jax "
                "from before checkpoints were verified is not read: start a new run from its parameters with "
                "--config.init_from=RUN_WORKDIR on that grpo_jax, or retrain)")
    try:
        manifest = json.loads(path.read_text())
        files, block_bytes = manifest["files"], manifest.get("block_bytes", 0)
    except (OSError, ValueError, KeyError) as e:
        return f"its manifest is unreadable: {e}"
    files = {rel: e for rel, e in files.items() if items is None or "/" not in rel or rel.split("/", 1)[0] in items}
    for rel, (size, _) in files.items():
        full = step_dir / rel
        if not full.exists():
            return f"{rel} is missing"
        if full.stat().length != size:
            return f"{rel} has {full.stat().length} bytes, {size} were written"
    # (file, block index) to read; a manifest of before block digests has one digest per file.
    whole = [(rel, None) for rel, (_, d) in files.items() if isinstance(d, str)]
    blocks = [(rel, i) for rel, (_, d) in files.items() if not isinstance(d, str) for i in range(len(d))]
    total = sum(size for size, _ in files.values())
    if read_bytes is not None and total > read_bytes:
        ends = {(rel, i) for rel, (_, d) in files.items() if not isinstance(d, str) for i in {0, len(d) - 1} if d}
        others = [b for b in blocks if b not in ends]
        budget = max(0, int(read_bytes // max(block_bytes, 1)) - len(ends))
        blocks = sorted(ends) + (rng or random.Random()).sample(others, min(budget, len(others)))
    for rel, i in whole:
        with (step_dir / rel).open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != files[rel][1]:
                return f"the SHA-256 of {rel} differs from the one recorded when it was written"
    for rel, i in blocks:
        if not _check_block(step_dir / rel, i, block_bytes, files[rel][1][i]):
            return (f"the SHA-256 of {rel} (its block {i}, from byte {i * block_bytes}) differs from the one "
                    "recorded when it was written")
    return None


def manifest_bytes(step_dir: str | os.PathLike) -> int:
    """The bytes a checkpoint's manifest lists (0 when it has none)."""
    try:
        return sum(size for size, _ in storage.read_json(storage.path(step_dir) / MANIFEST)["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


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


def _choose(manager: ocp.CheckpointManager, steps: list[int], items: tuple[str, ...] | None = None,
            read_bytes: float | None = VERIFY_BYTES, say: Callable[[str], None] = print) -> tuple[int | None, list]:
    """The newest of `steps` (newest first) whose files (of `items`, default all) are intact, and
    the (step, why) of the damaged ones before it; at most `read_bytes` of each is read back (see
    `problem`). Verified on process 0 only (every host reads the same files) and agreed by all."""
    chosen, damaged = -1, []
    if jax.process_index() == 0:
        for step in steps:
            step_dir = manager.directory / str(step)
            why = problem(step_dir, items, read_bytes)
            if why is None:
                chosen = step
                if read_bytes is not None and manifest_bytes(step_dir) > read_bytes:
                    say(f"checkpoint {step} ({_size(manifest_bytes(step_dir))}) was verified by its file sizes and "
                        f"blocks sampled up to {_size(read_bytes)} (checkpoint.verify_gb); "
                        f"`python scripts/verify_checkpoint.py {manager.directory.parent}` reads every byte")
                break
            damaged.append((step, why))
    chosen = multihost.host_max([chosen])[0]
    return (None if chosen < 0 else chosen), damaged


def _set_aside(manager: ocp.CheckpointManager, damaged: list) -> epath.Path:
    """Move damaged checkpoints out of the way (a later save of the same step would collide);
    returns where to."""
    aside = damaged_directory(manager.directory)
    if damaged and jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for step, _ in damaged:
            dest = aside / str(step)
            if dest.exists():
                dest = aside / (str(step) + time.strftime("-%Y%m%d-%H%M%S"))
            (manager.directory / str(step)).rename(dest)
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
    if not (manager.directory / str(step) / name).is_dir():  # orbax: an item per folder
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
      verify_bytes: at most this many bytes of a checkpoint are read back to verify it before a
        restore (None: all); see `problem`.

    The workdir may be local or any URI epath and orbax know (gs://bucket/run).
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, base: dict[str, str] | None = None,
                 reference: dict[str, str] | None = None, asynchronous: bool = True,
                 say: Callable[[str], None] = print, verify_bytes: float | None = VERIFY_BYTES):
        self.base, self.reference, self.asynchronous, self.say = base, reference, asynchronous, say
        self.verify_bytes = verify_bytes
        self.dir = directory(workdir)
        # Steps handed to orbax, oldest first, whose manifest (each host: its share) is still due.
        self._writing: list[int] = []
        self._own: dict[int, dict] = {}  # process 0's share of a step's manifest, hashed at the barrier
        self._failed: CheckpointError | None = None
        self._orbax_errors = _OrbaxErrors()
        logging.getLogger("absl").addFilter(self._orbax_errors)  # orbax logs through absl
        if jax.process_index() == 0:
            for path in sorted(self.dir.glob(f"*{_TMP}*")):  # orbax deletes them (cleanup_tmp_directories); say so
                say(f"checkpoint {path.name.split('.')[0]} in {self.dir} was never finished (the run "
                    "stopped while writing it): removed")
        self._sync = ocp.multihost.get_barrier_sync_fn()
        handlers = dict(params=ocp.StandardCheckpointHandler(), state=ocp.StandardCheckpointHandler(),
                        base=ocp.JsonCheckpointHandler(), reference=ocp.JsonCheckpointHandler())
        self.manager = ocp.CheckpointManager(self.dir, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest,
                                           barrier_sync_fn=self._barrier)))

    def _step_folder(self, step: int) -> epath.Path:
        pending = sorted(self.dir.glob(f"{step}{_TMP}*"))
        return pending[0] if pending else self.dir / str(step)  # object stores: written in place

    def _barrier(self, *, key: str, timeout_ms: int) -> None:
        # Orbax's barriers of a multi-host save. Each host reaches "async_write_complete" once its
        # own files are written: it hashes them there, in parallel with the other hosts, so the
        # primary host's commit only merges the shares and hashes the shared files.
        if "async_write_complete" in key and self._writing:
            step, i = self._writing[0], jax.process_index()
            if i == 0:
                self._own[step] = file_digests(self._step_folder(step), host=0)
            else:
                write_partial_manifest(self._step_folder(step), i)
                self._writing.pop(0)
        self._sync(key=key, timeout_ms=timeout_ms)

    def _write_manifest(self) -> None:
        # Runs on the primary host in orbax's background thread, after every host's files are
        # written and before orbax renames STEP.orbax-checkpoint-tmp to STEP: the manifest is part
        # of the atomic commit. Saves are serialised, so the oldest pending step is this one.
        step = self._writing[0]
        write_manifest(self._step_folder(step), step, jax.process_count(), own=self._own.pop(step, None))
        self._writing.pop(0)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _fail(self, step: int, e: BaseException) -> CheckpointError:
        """The save of `step` failed: remove what it wrote and say why in one line."""
        self._writing.clear()
        self._own.clear()
        self._remove_unfinished()
        free = storage.free_bytes(self.dir)
        why = _short(e) + ("" if free is None else f"; {_size(free)} free there")
        fix = ("Free some space (or lower checkpoint.keep) and resume" if _short(e) in _SPACE else
               "Fix what the error names and resume")  # e.g. a barrier that timed out: not the disk
        self._failed = CheckpointError(
            f"checkpoint {step} could not be written to {self.dir} ({why}): its "
            f"partial files were removed and the earlier checkpoints are intact. {fix}")
        return self._failed

    def _remove_unfinished(self, settle_s: float = 0.0) -> None:
        """Remove unfinished saves' folders; for `settle_s` more seconds, again as they reappear
        (tensorstore finishes the writes orbax stopped waiting for, recreating their folders)."""
        if jax.process_index() != 0:
            return
        end = time.monotonic() + settle_s
        while True:
            for path in self.dir.glob(f"*{_TMP}*"):
                try:
                    path.rmtree(missing_ok=True)
                except OSError:  # tensorstore may be writing into it still: removed on the next pass
                    pass
            if time.monotonic() >= end:
                return
            time.sleep(0.05)

    def save(self, state: train_state.TrainState) -> None:
        step = int(state.step)
        params, rest = train_state.to_items(state)
        nbytes = sum(x.nbytes for x in jax.tree.leaves((params, rest)))
        free = storage.free_bytes(self.dir)
        if free is not None and nbytes > free:  # refused before writing anything: a half-written checkpoint helps no one
            raise CheckpointError(f"checkpoint {step} needs about {_size(nbytes)} but {self.dir} has {_size(free)} "
                                  "free: free some space (or lower checkpoint.keep) and resume")
        items = dict(params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(rest))
        for name, record in (("base", self.base), ("reference", self.reference)):
            if record is not None:
                items[name] = ocp.args.JsonSave(record)
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
        chosen, damaged = _choose(self.manager, steps, read_bytes=self.verify_bytes, say=self.say)
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


def restore_params(workdir: str | os.PathLike, like: Any, step: int | None = None, base: str | None = None,
                   say: Callable[[str], None] = print, verify_bytes: float | None = VERIFY_BYTES) -> tuple[Any, int]:
    """The parameters of run `workdir`'s newest intact checkpoint (or the one at `step`), restored
    in the structure and shardings of `like` (arrays or ShapeDtypeStructs); a LoRA run's adapters
    when `base`, the fingerprint of the base they must belong to, is given. Returns (params, step)."""
    path = directory(workdir)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False, read_only=True)) as manager:
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
        # The files it reads, not the optimizer's.
        chosen, damaged = _choose(manager, steps, items=("params", "base"), read_bytes=verify_bytes, say=say)
        if chosen is None:
            raise CheckpointError(_damage_report(manager, damaged) + ": no intact checkpoint to take the parameters from")
        if damaged:
            say(_damage_report(manager, damaged) + f"; taking the parameters of checkpoint {chosen} instead")
        if base is not None:
            _check_base(manager, chosen, base)
        out = manager.restore(chosen, args=ocp.args.Composite(params=ocp.args.StandardRestore(_target(like))))
    return out["params"], chosen
