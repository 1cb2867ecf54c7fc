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
reported a successful write. Old sets are deleted only after a newer one is
complete, so the newest complete set always survives a failed save.

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

import numpy as np
import torch

from utils.atomic_file import atomic_path, atomic_write
from utils.distributed import DistContext, any_rank
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
    """torch.save to a temporary file, fsync, rename, fsync the folder. Returns the file size."""
    with atomic_path(path, durable=True) as tmp:
        torch.save(obj, tmp)
        size = tmp.stat().st_size
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
    logger=None,
) -> Path:
    """Write this rank's `state` into the set for `step`; rank 0 completes it with the manifest.

    Collective: every rank must call it. Raises CheckpointError on every rank if any
    rank failed to write (the incomplete set is removed; earlier sets are untouched).
    """
    set_dir = Path(output) / CHECKPOINT_DIR / set_dirname(step)
    if ctx.is_main and set_dir.exists():
        # Left by an attempt that crashed mid-save, or by a timeline abandoned on resume:
        # its files must not mix with this save's.
        shutil.rmtree(set_dir, ignore_errors=True)
    ctx.barrier()
    error = None
    try:
        set_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({**state, "format_version": FORMAT_VERSION}, set_dir / rank_filename(ctx.rank))
    except OSError as exc:
        error = f"rank {ctx.rank} could not write {set_dir / rank_filename(ctx.rank)}: {exc.strerror or exc}"
        if logger is not None:
            logger.error(error)
    if any_rank(error is not None, ctx):
        if ctx.is_main:
            shutil.rmtree(set_dir, ignore_errors=True)
        ctx.barrier()
        raise CheckpointError(error or f"another rank failed to write its part of {set_dir}; it was removed")

    if ctx.is_main:
        try:
            atomic_write_text(_manifest(step, state, ctx.world_size), set_dir / MANIFEST)
            error = None
        except OSError as exc:
            error = f"could not write {set_dir / MANIFEST}: {exc.strerror or exc}"
    if any_rank(error is not None, ctx):
        if ctx.is_main:
            shutil.rmtree(set_dir, ignore_errors=True)
        ctx.barrier()
        raise CheckpointError(error or f"rank 0 could not complete {set_dir}")

    # Only now, with a newer complete set on disk, may older ones go.
    if mirror_top_level:
        _mirror(set_dir, Path(output), ctx.rank)
    ctx.barrier()
    if ctx.is_main:
        prune(output, keep)
    return set_dir


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
    except OSError as exc:
        shutil.rmtree(set_dir, ignore_errors=True)
        raise CheckpointError(f"could not write {set_dir}: {exc.strerror or exc}") from None
    return set_dir


def _mirror(set_dir: Path, output: Path, rank: int) -> None:
    """Expose the set's rank file as output/checkpoint_gpu_{rank}.pt (insightface's place)."""
    src = set_dir / rank_filename(rank)
    dst = output / rank_filename(rank)
    tmp = output / f".{dst.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # set files are never modified again, so a hard link is safe
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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


def load_newest(output: str | os.PathLike, ctx: DistContext, logger=None, map_location="cpu", loader=None):
    """Load this rank's state from the newest set that every rank can read.

    Collective. `loader(checkpoint_set, ctx) -> state` reads this rank's part (the
    default reads its own rank file from a set saved with the same world size). A
    corrupt or unreadable newest set falls back to the previous one with a warning.
    Returns (state, checkpoint_set) or (None, None) when there is nothing to resume.
    """
    loader = loader or _load_same_world_size
    sets = candidate_sets(output)
    # Rank 0 decides the order; every rank walks the same list.
    for cset in sets:
        state, error = None, None
        try:
            state = loader(cset, ctx, map_location)
        except CheckpointError as exc:
            error = str(exc)
        if not any_rank(error is not None, ctx):
            return state, cset
        if logger is not None and ctx.is_main:
            logger.warning(f"cannot resume from {cset.path}: {error or 'another rank could not read its file'}; trying an older checkpoint")
    return None, None


def _load_same_world_size(cset: CheckpointSet, ctx: DistContext, map_location) -> dict:
    if cset.world_size is not None and cset.world_size != ctx.world_size:
        raise CheckpointError(
            f"{cset.path} was saved by {cset.world_size} ranks and this run has {ctx.world_size}"
        )
    return load_rank_file(cset.rank_file(ctx.rank), map_location)
