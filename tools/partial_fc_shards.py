#!/usr/bin/env python
"""Merge the per-rank PartialFC shards of a checkpoint into one file, or split one into W ranks.

    python tools/partial_fc_shards.py merge work_dirs/ms1mv3_r50 merged.pt
    python tools/partial_fc_shards.py split merged.pt work_dirs/ms1mv3_r50_4gpu --world-size 4

merge reads a checkpoint set -- an output folder (its newest complete set), a set
folder (output/checkpoints/step_N) or insightface's checkpoint_gpu_{rank}.pt files --
and writes one world-size-1 checkpoint: all class centres in
state_dict_softmax_fc.weight [num_classes, embedding_size], their optimizer rows,
the backbone and the training position. That file is a valid `pretrained_fc` (and
`pretrained`) for fine-tuning. split turns such a file into a complete checkpoint
set for W ranks under OUTPUT/checkpoints, which `train.py --output=OUTPUT
--resume=True` continues on W ranks. (train.py also re-shards by itself when the
world size changes; these commands are for moving or inspecting checkpoints.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _cli import run_main  # first: puts the repository on sys.path

from utils.errors import UserError


def _source_set(path: Path):
    from utils import checkpoint as ckpt

    if (path / ckpt.MANIFEST).is_file():
        complete, _ = ckpt.list_sets(path.parent.parent)
        for cset in complete:
            if cset.path.resolve() == path.resolve():
                return cset
        raise UserError(f"{path} is not a complete checkpoint set")
    sets = ckpt.candidate_sets(path)
    if not sets:
        raise UserError(f"{path} holds no complete checkpoint set (checkpoints/step_*/manifest.json or checkpoint_gpu_0.pt)")
    return sets[0]


def merge_command(source: Path, output: Path) -> str:
    from utils import checkpoint as ckpt
    from losses.reshard import merge, saved_world_size

    if not source.exists():
        raise UserError(f"checkpoint not found: {source}")
    cset = _source_set(source)
    states = [ckpt.load_rank_file(cset.rank_file(r), mmap=True) for r in range(saved_world_size(cset))]
    merged = merge(states, str(cset.path))
    output.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_save(merged, output)
    weight = merged["state_dict_softmax_fc"]["weight"]
    return f"merged {len(states)} shards of {cset.path} into {output}: class centres {tuple(weight.shape)}, step {merged['global_step']}"


def split_command(merged_path: Path, output: Path, world_size: int) -> str:
    from utils import checkpoint as ckpt
    from losses.reshard import split

    if world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {world_size}")
    state = ckpt.load_rank_file(merged_path, mmap=True)
    if (state.get("world_size") or 1) != 1:
        raise UserError(f"{merged_path} is one rank's file of a {state['world_size']}-rank set; merge the set first")
    states = split(state, world_size, str(merged_path))
    set_dir = ckpt.write_set(output, int(state["global_step"]), states)
    return f"wrote {set_dir} for {world_size} ranks; continue with train.py CONFIG --output={output} --resume=True"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("merge", help="one checkpoint set -> one world-size-1 file")
    m.add_argument("source", type=Path, help="output folder, checkpoints/step_N folder, or insightface output folder")
    m.add_argument("output", type=Path, help="the merged file to write, e.g. merged.pt")
    s = commands.add_parser("split", help="one merged file -> a checkpoint set for W ranks")
    s.add_argument("merged", type=Path)
    s.add_argument("output", type=Path, help="output folder of the run to continue; the set goes into OUTPUT/checkpoints")
    s.add_argument("--world-size", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "merge":
        print(merge_command(args.source, args.output))
    else:
        print(split_command(args.merged, args.output, args.world_size))
    return 0


if __name__ == "__main__":
    run_main(main)
