"""Re-shard a checkpoint set for another number of ranks.

A set saved by W ranks holds, per rank, the class centres of one contiguous
class range (`losses.partial_fc.shard_range`) and the optimizer state of those
rows (SGD `momentum_buffer`; AdamW `exp_avg`, `exp_avg_sq` and, with sampling,
the per-row `row_step` of `losses.optim.SampledRowAdamW`). A rank of a run with
W' ranks takes the rows of its own new class range from whichever old files
hold them; everything that is the same on every rank (backbone, its optimizer
state, scheduler, scaler, position) comes from old rank 0. The random-number
states are per rank and cannot be mapped, so they are dropped: a run resumed
on another world size continues from the same weights and optimizer state but
not with the same random draws.

With sub-centres (num_subcenters = K) a class owns K consecutive rows, c*K + k, of the
centre matrix and of its optimizer state: ranges of classes become ranges of K times as
many rows. The margin's state (AdaFace's running statistics, CurricularFace's t,
ElasticFace's generator: `margin_loss.*` in the head's state_dict) is the same on every
rank and comes from old rank 0 like the rest of the head's state_dict.

The same functions merge a set into one world-size-1 state and split such a
state into W' rank states (tools/partial_fc_shards.py).

`translate_position` maps the data position of the saved run onto the new
global batch size (see its docstring).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from losses.partial_fc import shard_range
from utils.checkpoint import CheckpointError, CheckpointSet, load_rank_file, rank_filename

PARTIAL_FC_GROUP = "partial_fc"


# --- where the rows live ----------------------------------------------------------------

def _class_range(state: dict, rank: int, world_size: int, num_classes: int, k: int, where: str) -> tuple[int, int]:
    """(first row, rows) of a saved rank file -- its class range times K sub-centres --
    checked against its class centres."""
    rows = _weight(state, where).shape[0]
    meta = state.get("partial_fc") or {}
    start, num_local = shard_range(num_classes, rank, world_size)
    saved = (meta.get("class_start", start), meta.get("num_local", num_local))
    if saved != (start, num_local) or rows != num_local * k:
        per = f", {k} sub-centres each" if k > 1 else ""
        raise CheckpointError(
            f"{where} holds classes {saved[0]}..{saved[0] + rows // k - 1} ({rows} rows{per}), expected "
            f"{start}..{start + num_local - 1} for rank {rank} of {world_size} with {num_classes} classes"
        )
    return start * k, num_local * k


def _num_subcenters(base: dict, where: str) -> int:
    """K of a set: rank 0's metadata (files written before sub-centres existed: 1)."""
    k = (base.get("partial_fc") or {}).get("num_subcenters", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CheckpointError(f"{where}: partial_fc.num_subcenters must be a positive integer, got {k!r}")
    return k


def _weight(state: dict, where: str) -> torch.Tensor:
    fc = state.get("state_dict_softmax_fc")
    weight = fc.get("weight") if isinstance(fc, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CheckpointError(f"{where} has no PartialFC class centres (state_dict_softmax_fc.weight)")
    return weight


def _head_param_index(optimizer_state: dict, where: str) -> int | None:
    """Index of the class-centre parameter in the optimizer state (None: no optimizer state)."""
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    if not groups:
        return None
    named = [g for g in groups if g.get("name") == PARTIAL_FC_GROUP]
    group = named[0] if named else groups[-1]  # insightface: [backbone, partial_fc]
    if len(group["params"]) != 1:
        raise CheckpointError(f"{where}: the PartialFC optimizer group has {len(group['params'])} parameters, expected 1")
    return group["params"][0]


def _rows(parts: list[tuple[int, int, torch.Tensor | None]], start: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """Rows [start, start + count) of a tensor split into parts (part_start, part_rows, tensor).

    A part without the tensor contributes zeros: an optimizer state that a rank
    never created is the state of rows never updated.
    """
    pieces = []
    for part_start, part_rows, tensor in parts:
        lo, hi = max(start, part_start), min(start + count, part_start + part_rows)
        if lo >= hi:
            continue
        if tensor is None:
            pieces.append(torch.zeros((hi - lo, *like.shape[1:]), dtype=like.dtype))
        else:
            pieces.append(tensor[lo - part_start : hi - part_start])
    if not pieces:
        return like.new_zeros((0, *like.shape[1:]))
    return torch.cat(pieces).contiguous()  # a copy: no view keeps a whole old shard alive


# --- re-sharding --------------------------------------------------------------------------

def reshard(sources: dict[int, dict], old_world_size: int, rank: int, world_size: int, where: str = "checkpoint") -> dict:
    """This rank's state for `world_size` ranks, from the rank states of a set saved by `old_world_size`.

    `sources` maps old rank -> state; it must hold old rank 0 and every old rank whose
    classes overlap the new rank's range (`needed_ranks`).
    """
    if 0 not in sources:
        raise CheckpointError(f"{where}: rank 0's file is needed to re-shard")
    base = sources[0]
    subcenters = _num_subcenters(base, where)
    num_classes = _num_classes(base, old_world_size, sources, subcenters, where)
    class_start, class_count = shard_range(num_classes, rank, world_size)
    start, count = class_start * subcenters, class_count * subcenters  # rows
    ranges = {
        k: _class_range(state, k, old_world_size, num_classes, subcenters, f"{where}/{rank_filename(k)}")
        for k, state in sources.items()
    }
    missing = [k for k in needed_ranks(num_classes, old_world_size, rank, world_size) if k not in sources]
    if missing:
        raise CheckpointError(f"{where}: rank files {missing} are needed for rank {rank} of {world_size}")

    def parts(get):
        return [(ranges[k][0], ranges[k][1], get(sources[k])) for k in sorted(sources)]

    like = _weight(base, where)
    state = {k: v for k, v in base.items() if k not in ("rng", "state_dict_backbone")}
    if rank == 0 and "state_dict_backbone" in base:
        state["state_dict_backbone"] = base["state_dict_backbone"]  # DDP gives the other ranks rank 0's weights
    state["rank"], state["world_size"] = rank, world_size
    state["partial_fc"] = {
        **(base.get("partial_fc") or {}), "class_start": class_start, "num_local": class_count,
        "num_classes": num_classes, "embedding_size": like.shape[1], "num_subcenters": subcenters,
    }
    state["state_dict_softmax_fc"] = {
        **base["state_dict_softmax_fc"],
        "weight": _rows(parts(lambda s: _weight(s, where)), start, count, like),
    }
    optimizer = base.get("state_optimizer")
    index = _head_param_index(optimizer, where)
    if index is not None:
        state["state_optimizer"] = _reshard_optimizer(optimizer, index, sources, ranges, start, count, where)
    return state


def _num_classes(base: dict, old_world_size: int, sources: dict[int, dict], subcenters: int, where: str) -> int:
    saved = (base.get("partial_fc") or {}).get("num_classes")
    if saved is not None:
        return int(saved)
    if len(sources) == old_world_size:  # insightface's files: the shards add up to all classes
        return sum(_weight(s, where).shape[0] for s in sources.values()) // subcenters
    raise CheckpointError(f"{where}: rank 0's file does not say how many classes the run has (partial_fc.num_classes)")


def _reshard_optimizer(optimizer: dict, index: int, sources, ranges, start: int, count: int, where: str) -> dict:
    head_states = {}
    for k, s in sources.items():
        opt = s.get("state_optimizer")
        if not isinstance(opt, dict) or _head_param_index(opt, where) != index:
            raise CheckpointError(f"{where}/{rank_filename(k)}: its optimizer state does not match rank 0's")
        head_states[k] = opt["state"].get(index, opt["state"].get(str(index), {}))
    new_head = {}
    for key in sorted({key for st in head_states.values() for key in st}):
        values = {k: st.get(key) for k, st in head_states.items()}
        example = next(v for v in values.values() if v is not None)
        per_row = all(
            v is None or (isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == ranges[k][1])
            for k, v in values.items()
        )
        if isinstance(example, torch.Tensor) and example.dim() >= 1 and per_row:
            new_head[key] = _rows(
                [(ranges[k][0], ranges[k][1], values[k]) for k in sorted(values)], start, count, example
            )
        else:
            # Per-parameter scalars (Adam's `step`) advance together on every rank; take the
            # largest in case one shard never created its state.
            new_head[key] = max((v for v in values.values() if v is not None), key=lambda v: float(v))
    state = dict(optimizer["state"])
    state.pop(str(index), None)
    if new_head:
        state[index] = new_head
    else:
        state.pop(index, None)
    return {"state": state, "param_groups": optimizer["param_groups"]}


def needed_ranks(num_classes: int, old_world_size: int, rank: int, world_size: int) -> list[int]:
    """Old ranks whose class range overlaps the new rank's, plus rank 0."""
    start, count = shard_range(num_classes, rank, world_size)
    needed = {0}
    for k in range(old_world_size):
        s, n = shard_range(num_classes, k, old_world_size)
        if s < start + count and start < s + n:
            needed.add(k)
    return sorted(needed)


def merge(states: list[dict], where: str = "checkpoint") -> dict:
    """One world-size-1 state holding all class centres and their optimizer rows."""
    return reshard(dict(enumerate(states)), len(states), 0, 1, where)


def split(state: dict, world_size: int, where: str = "checkpoint") -> list[dict]:
    """Rank states for `world_size` ranks from one world-size-1 state."""
    return [reshard({0: state}, 1, rank, world_size, where) for rank in range(world_size)]


# --- loading a set for this rank ----------------------------------------------------------

def saved_world_size(cset: CheckpointSet) -> int:
    """World size of a set: its manifest, or the number of insightface rank files."""
    if cset.world_size is not None:
        return cset.world_size
    count = 0
    while cset.rank_file(count).is_file():
        count += 1
    return max(count, 1)


def load_for_rank(cset: CheckpointSet, ctx, map_location="cpu") -> dict:
    """This rank's state from `cset`, re-sharded when it was saved by another number of ranks.

    The loader `utils.checkpoint.load_newest` calls: a CheckpointError makes every rank
    fall back to an older set. Old files are memory-mapped, so a rank reads only the
    rows it keeps.
    """
    old_world_size = saved_world_size(cset)
    if old_world_size == ctx.world_size:
        return load_rank_file(cset.rank_file(ctx.rank), map_location)
    base = load_rank_file(cset.rank_file(0), map_location, mmap=True)
    num_classes = (base.get("partial_fc") or {}).get("num_classes")
    if num_classes is None:  # insightface's files: every shard is needed to count the classes
        ranks = range(old_world_size)
    else:
        ranks = needed_ranks(int(num_classes), old_world_size, ctx.rank, ctx.world_size)
    sources = {0: base}
    for k in ranks:
        if k not in sources:
            sources[k] = load_rank_file(cset.rank_file(k), map_location, mmap=True)
    state = reshard(sources, old_world_size, ctx.rank, ctx.world_size, str(cset.path))
    state["resharded_from_world_size"] = old_world_size
    return state


# --- the data position under another global batch size ------------------------------------

@dataclass(frozen=True)
class Position:
    epoch: int
    batch_in_epoch: int  # batches of the new global batch already consumed in `epoch`
    schedule_step: int  # optimizer steps of the new plan up to this position


def translate_position(
    epoch: int, batch_in_epoch: int, saved_global_batch: int, global_batch: int, gradient_acc: int, steps_per_epoch: int
) -> Position:
    """Where a run with another global batch size continues.

    Every epoch deals out one permutation of the data set in order, whatever the world
    size (dataset.sampler), so "b batches of G samples consumed" means the first b * G
    samples of the epoch's permutation. The new run skips as many whole new global
    batches (of whole optimizer steps) as fit into those samples: when b * G is a
    multiple of the new global batch it continues with exactly the samples the old run
    would have seen next; otherwise it sees again fewer than one optimizer step's
    samples. `schedule_step` is the step the new run would have reached at that position
    (epoch * steps_per_epoch + steps of this epoch): the learning-rate schedule and the
    remaining steps continue from there.

    `saved_global_batch` and `global_batch` are per batch (batch_size * world_size);
    `steps_per_epoch` and `gradient_acc` are the new run's.
    """
    samples = batch_in_epoch * saved_global_batch
    batch = samples // global_batch
    batch -= batch % gradient_acc
    if batch >= steps_per_epoch * gradient_acc:  # the saved run was past the new epoch's last whole step
        epoch, batch = epoch + 1, 0
    return Position(epoch, batch, epoch * steps_per_epoch + batch // gradient_acc)
