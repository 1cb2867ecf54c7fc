"""Crash-safe training checkpoints.

Layout under the output folder:

    checkpoints/step_000012000/checkpoint_gpu_0.pt   one file per rank
    checkpoints/step_000012000/checkpoint_gpu_1.pt
    checkpoints/step_000012000/manifest.json         written last, by rank 0
    checkpoint_gpu_{rank}.pt                         with save_all_states: the newest
                                                      complete set, where insightface keeps it

Every file is written to a temporary name, fsynced and renamed, so a crash never
leaves a half-written file under a final name. A set counts as complete only
once its manifest exists, and rank 0 writes the manifest only after every rank
reported a successful write. model.pt and the top-level mirrors are replaced only
after that, together. Old sets are deleted only after a newer one is complete, so
the newest complete set always survives a failed save. Every write is voted on
(utils.distributed.first_error): a failure of any kind on one rank stops every rank
with the same CheckpointError, never one rank while the others wait.

A rank file is a dict of tensors and plain values, loadable with
torch.load(weights_only=True). Keys follow insightface's checkpoint_gpu_{rank}.pt
(epoch, global_step, state_dict_backbone, state_dict_softmax_fc, state_optimizer,
state_lr_scheduler) plus: batch_in_epoch, world_size, rank, partial_fc (class_start,
num_local, num_classes, embedding_size), state_scaler, rng, run (network,
embedding_size, num_classes, global_batch_size, gradient_acc), format_version.
`epoch` is the epoch to continue in and `batch_in_epoch` the number of batches of
it already consumed (insightface's files mean `epoch` the same way, at batch 0).
The backbone is stored in rank 0's file only: DDP broadcasts rank 0's weights
to the other ranks when it wraps the model.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.atomic_file import atomic_write, fsync_dir
from utils.distributed import DistContext, broadcast_object, first_error, same_on_every_rank
from utils.errors import UserError

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_SET_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or used; the message names file and reason."""


def rank_filename(rank: int) -> str:
    return f"checkpoint_gpu_{rank}.pt"


def set_dirname(step: int) -> str:
    return f"step_{step:09d}"


def atomic_save(obj, path: str | os.PathLike) -> int:
    """torch.save to a temporary file, fsync, rename, fsync the folder. Returns the file size.

    Saved through a Python file object, not a path: a failed write then raises the OSError
    behind it (file too large, no space left on device) as the RuntimeError's context, which
    the checkpoint vote reports; torch's own file writer only says "iostream error".
    """
    with atomic_write(path, "wb", durable=True) as f:
        torch.save(obj, f)
        f.flush()
        size = f.tell()
    return size


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_write(path, "w", durable=True) as f:
        f.write(text)


# --- random number generator states ---------------------------------------------------

def capture_rng_state(device: torch.device) -> dict:
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# --- finding sets -------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointSet:
    path: Path
    step: int
    manifest: dict | None  # None: insightface's top-level files (no manifest)

    @property
    def world_size(self) -> int | None:
        return None if self.manifest is None else int(self.manifest["world_size"])

    def rank_file(self, rank: int) -> Path:
        return self.path / rank_filename(rank)


def _read_manifest(set_dir: Path) -> dict | None:
    try:
        manifest = json.loads((set_dir / MANIFEST).read_text())
        int(manifest["world_size"]), int(manifest["global_step"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_sets(output: str | os.PathLike) -> tuple[list[CheckpointSet], list[Path]]:
    """(complete sets newest first, incomplete set folders)."""
    root = Path(output) / CHECKPOINT_DIR
    complete, incomplete = [], []
    if root.is_dir():
        for entry in root.iterdir():
            m = _SET_RE.match(entry.name)
            if not m or not entry.is_dir():
                continue
            manifest = _read_manifest(entry)
            if manifest is None:
                incomplete.append(entry)
            else:
                complete.append(CheckpointSet(entry, int(m.group(1)), manifest))
    complete.sort(key=lambda s: s.step, reverse=True)
    return complete, incomplete


def legacy_set(output: str | os.PathLike) -> CheckpointSet | None:
    """insightface's layout: checkpoint_gpu_{rank}.pt directly in the output folder."""
    path = Path(output)
    if (path / rank_filename(0)).is_file():
        return CheckpointSet(path, -1, None)
    return None


def has_checkpoints(output: str | os.PathLike) -> bool:
    complete, incomplete = list_sets(output)
    return bool(complete or incomplete or legacy_set(output))


# --- saving -------------------------------------------------------------------------

def _manifest(step: int, state: dict, world_size: int) -> str:
    manifest = {
        "format_version": FORMAT_VERSION,
        "global_step": step,
        "epoch": state.get("epoch"),
        "batch_in_epoch": state.get("batch_in_epoch"),
        "world_size": world_size,
        "files": [rank_filename(r) for r in range(world_size)],
    }
    return json.dumps(manifest, indent=2) + "\n"


def save_set(
    output: str | os.PathLike,
    step: int,
    state: dict,
    ctx: DistContext,
    *,
    keep: int = 2,
    mirror_top_level: bool = False,
    main_files: dict[str, object] | None = None,
    logger=None,
) -> Path:
    """Write every file of checkpoint step `step`; collective, every rank passes its own `state`.

    In order: each rank's file into checkpoints/step_N/; rank 0's `main_files` ({name: object
    for torch.save} in `output`, e.g. {"model.pt": backbone state_dict}) and, with
    `mirror_top_level`, every rank's output/checkpoint_gpu_{rank}.pt, both under temporary
    names; the manifest (from here on the set is complete); then the temporary files
    replace the top-level ones together, mirrors of ranks beyond this world size are
    removed, and old sets are pruned to `keep`.

    Any exception on any rank while writing (an OSError, or torch's zip writer failing with
    "unexpected pos" when the disk fills or a file-size limit is hit) is voted on: every rank
    raises the same CheckpointError, `checkpoint step_N not written on rank R: <cause>:
    <file>`, within one collective call. The new set is then removed and no top-level
    file replaced, so the previous complete set and model.pt stay as they were.
    """
    output = Path(output)
    set_dir = output / CHECKPOINT_DIR / set_dirname(step)
    if ctx.is_main and set_dir.exists():
        # Left by an attempt that crashed mid-save, or by a timeline abandoned on resume:
        # its files must not mix with this save's.
        shutil.rmtree(set_dir, ignore_errors=True)
    ctx.barrier()
    staged: list[tuple[Path, Path]] = []  # (temporary, final) top-level files of this step

    def give_up(error: str, remove_set: bool):
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if ctx.is_main and remove_set:
            shutil.rmtree(set_dir, ignore_errors=True)
        ctx.barrier()
        if logger is not None and ctx.is_main:
            logger.error(error)
        return CheckpointError(error)

    # 1. every rank's part, and the top-level files under temporary names
    rank_file = set_dir / rank_filename(ctx.rank)
    writes = [(rank_file, lambda: _write_rank_file(state, set_dir, rank_file))]
    if mirror_top_level:
        mirror = output / rank_filename(ctx.rank)
        writes.append((mirror, lambda: staged.append(_stage_link(rank_file, mirror))))
    if ctx.is_main:
        for name, obj in (main_files or {}).items():
            writes.append((output / name, lambda obj=obj, final=output / name: staged.append(_stage_save(obj, final))))
    what = f"checkpoint {set_dir.name} not written"
    error = first_error(_first_failure(writes, f"{what} on rank {ctx.rank}"), ctx)
    if error is not None:
        raise give_up(error, remove_set=True)

    # 2. the manifest makes the set complete
    manifest = set_dir / MANIFEST
    writes = [(manifest, lambda: atomic_write_text(_manifest(step, state, ctx.world_size), manifest))] if ctx.is_main else []
    error = first_error(_first_failure(writes, f"{what} on rank {ctx.rank}"), ctx)
    if error is not None:
        raise give_up(error, remove_set=True)

    # 3. the top-level files, replaced together now that the set they belong to is complete
    writes = [(final, lambda tmp=tmp, final=final: _replace(tmp, final)) for tmp, final in staged]
    if mirror_top_level and ctx.is_main:
        writes.append((output, lambda: _remove_mirrors_beyond(output, ctx.world_size)))
    error = first_error(_first_failure(writes, f"checkpoint {set_dir.name} is complete but not exposed on rank {ctx.rank}"), ctx)
    if error is not None:
        if mirror_top_level:  # a mixed set of mirrors must not stay: remove them all
            (output / rank_filename(ctx.rank)).unlink(missing_ok=True)
        raise give_up(error, remove_set=False)

    # 4. only now, with a newer complete set on disk, may older ones go
    ctx.barrier()
    if ctx.is_main:
        try:
            prune(output, keep)
        except Exception as exc:  # old sets left behind cost space, not correctness
            if logger is not None:
                logger.warning(f"could not remove old checkpoint sets in {output / CHECKPOINT_DIR}: {_cause(exc)}")
    return set_dir


def save_final(
    output: str | os.PathLike,
    ctx: DistContext,
    files: dict[str, object],
    *,
    exports: dict[str, Callable[[Path], object]] | None = None,
) -> list[Path]:
    """Rank 0 writes the run's final files into `output`; collective, every rank calls it.

    `files` are saved with torch.save ({"model.pt": backbone state_dict}); each of
    `exports` ({"model.onnx": export(path)}) is called with its path and must write it
    atomically. Any exception is voted on like a checkpoint write: every rank raises the
    same CheckpointError, `final weights not written on rank 0: <cause>: <file>`.
    """
    output = Path(output)
    written: list[Path] = []
    writes = []
    if ctx.is_main:
        for name, obj in files.items():
            writes.append((output / name, lambda obj=obj, path=output / name: (atomic_save(obj, path), written.append(path))))
        for name, export in (exports or {}).items():
            writes.append((output / name, lambda export=export, path=output / name: (export(path), written.append(path))))
    error = first_error(_first_failure(writes, f"final weights not written on rank {ctx.rank}"), ctx)
    if error is not None:
        raise CheckpointError(error)
    return written


def _write_rank_file(state: dict, set_dir: Path, path: Path) -> None:
    set_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({**state, "format_version": FORMAT_VERSION}, path)


def _first_failure(writes: list[tuple[Path, Callable[[], object]]], what: str) -> str | None:
    """Run the writes in order; the first failure as one line `<what>: <cause>: <file>`."""
    for path, write in writes:
        try:
            write()
        except Exception as exc:  # whatever the type: it becomes this rank's vote
            return f"{what}: {_cause(exc)}: {path}"
    return None


def _cause(exc: BaseException) -> str:
    """Why a write failed, in one line.

    torch.save reports a failed write of its zip writer as RuntimeError("[enforce fail at
    inline_container.cc] ... unexpected pos ..."); the OSError behind it (no space left on
    device, file too large) is its __context__, and says more.
    """
    seen, depth = exc, 0
    while seen is not None and depth < 8:
        if isinstance(seen, OSError) and seen.strerror:
            return f"[Errno {seen.errno}] {seen.strerror}" if seen.errno else seen.strerror
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _staging_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.staged-{os.getpid()}")


def _stage_save(obj, final: Path) -> tuple[Path, Path]:
    tmp = _staging_name(final)
    atomic_save(obj, tmp)
    return tmp, final


def _stage_link(src: Path, final: Path) -> tuple[Path, Path]:
    """The set's rank file under a temporary name beside `final` (insightface's place for it)."""
    tmp = _staging_name(final)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # set files are never modified again, so a hard link is safe
    except OSError:
        try:
            shutil.copyfile(src, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tmp, final


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _remove_mirrors_beyond(output: Path, world_size: int) -> None:
    """Mirrors of ranks that this run does not have (a larger earlier world size): they would
    make the top-level files look like a set of another size."""
    for path in output.glob("checkpoint_gpu_*.pt"):
        m = re.fullmatch(r"checkpoint_gpu_(\d+)\.pt", path.name)
        if m and int(m.group(1)) >= world_size:
            path.unlink(missing_ok=True)


def write_set(output: str | os.PathLike, step: int, states: list[dict]) -> Path:
    """Write a complete set for len(states) ranks from one process (offline tools).

    Same guarantees as save_set: rank files first, the manifest last, then pruning of
    nothing -- an existing set for `step` is refused rather than replaced.
    """
    set_dir = Path(output) / CHECKPOINT_DIR / set_dirname(step)
    if set_dir.exists():
        raise CheckpointError(f"{set_dir} already exists; choose another output folder")
    set_dir.mkdir(parents=True)
    try:
        for rank, state in enumerate(states):
            atomic_save({**state, "format_version": FORMAT_VERSION}, set_dir / rank_filename(rank))
        atomic_write_text(_manifest(step, states[0], len(states)), set_dir / MANIFEST)
    except Exception as exc:
        shutil.rmtree(set_dir, ignore_errors=True)
        raise CheckpointError(f"could not write {set_dir}: {_cause(exc)}") from None
    return set_dir


def set_aside_newer(output: str | os.PathLike, step: int) -> list[Path]:
    """Rename the complete sets newer than `step` to step_N.unreadable (kept for inspection).

    Called once a run resumed from the set of `step` because the newer ones could not be
    read: otherwise pruning would count them among the sets to keep and delete good ones.
    """
    moved = []
    complete, _ = list_sets(output)
    for cset in complete:
        if cset.step > step:
            target = cset.path.with_name(f"{cset.path.name}.unreadable")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(cset.path, target)
            moved.append(target)
    return moved


def prune(output: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` complete sets (at least one); drop incomplete sets older than the newest."""
    complete, incomplete = list_sets(output)
    keep = max(1, keep)
    for old in complete[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)
    if complete:
        newest = complete[0].step
        for path in incomplete:
            m = _SET_RE.match(path.name)
            if m and int(m.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)


# --- loading ------------------------------------------------------------------------

def load_rank_file(path: Path, map_location="cpu", *, mmap: bool = False) -> dict:
    """One rank's file, as plain tensors and values (weights_only: nothing else is unpickled).

    mmap=True maps the file instead of reading it: only the parts used are read (re-sharding).
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as exc:  # truncated zip, bad pickle, unsupported object ...
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"checkpoint file {path} is not a training checkpoint (no global_step)")
    return state


def candidate_sets(output: str | os.PathLike) -> list[CheckpointSet]:
    complete, _ = list_sets(output)
    legacy = legacy_set(output)
    return complete + ([legacy] if legacy else [])


def load_newest(
    output: str | os.PathLike, ctx: DistContext, logger=None, map_location="cpu", loader=None, check=None
):
    """Load this rank's state from the newest set that every rank can read; collective.

    Rank 0 lists the candidate sets and every rank walks that one list (nodes whose views
    of a shared file system differ still try the same sets in the same order).
    `loader(checkpoint_set, ctx, map_location) -> state` reads this rank's part (the
    default reads its own rank file from a set saved with the same world size);
    `check(state, checkpoint_set)`, if given, may refuse a loaded state by raising. Any
    exception of either on any rank (a corrupt file, a KeyError or a shape error in a
    readable but malformed one) is voted on, and so is the step: every rank must hold the
    same global_step. A set that fails on any rank is skipped by every rank with a warning
    naming the file and the reason (on every rank, the same line), and the next older set
    is tried. Returns (state, checkpoint_set), or (None, None) when there is no set at all;
    raises CheckpointError on every rank when there are sets but none can be used.
    """
    loader = loader or _load_same_world_size
    sets, error = None, None
    if ctx.is_main:
        try:
            sets = candidate_sets(output)
        except Exception as exc:
            error = f"cannot list the checkpoints in {output}: {_cause(exc)}"
    sets, error = broadcast_object((sets, error), ctx)
    if error is not None:
        raise CheckpointError(error)
    skipped = []
    for cset in sets:
        state, error = None, None
        try:
            state = loader(cset, ctx, map_location)
            if check is not None:
                check(state, cset)
            step = int(state["global_step"])
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"{cset.path} cannot be used on rank {ctx.rank}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        error = first_error(error, ctx)
        if error is None:
            low, high = same_on_every_rank(step, ctx)
            if low != high:
                error = f"the rank files of {cset.path} are of different steps ({low} to {high}): they are not one set"
        if error is None:
            return state, cset
        skipped.append(error)
        if logger is not None:
            logger.warning(f"cannot resume from {cset.path}: {error}; trying an older checkpoint")
    if sets:
        raise CheckpointError(
            f"none of the checkpoints in {output} can be read ({'; '.join(skipped)}); "
            f"move them away to start a new run there"
        )
    return None, None


def _load_same_world_size(cset: CheckpointSet, ctx: DistContext, map_location) -> dict:
    if cset.world_size is not None and cset.world_size != ctx.world_size:
        raise CheckpointError(
            f"{cset.path} was saved by {cset.world_size} ranks and this run has {ctx.world_size}"
        )
    return load_rank_file(cset.rank_file(ctx.rank), map_location)
