#!/usr/bin/env python
"""List the training samples far from their class's dominant sub-centre: likely label noise.

    python tools/subcenter_noise.py work_dirs/ms1mv3_r50_subcenter /train_tmp/ms1m-retinaface-t1 noisy.csv
    python tools/subcenter_noise.py CHECKPOINT DATA OUT.csv [--max-angle 75] [--all] [--batch-size 256]

The second step of sub-center ArcFace (Deng et al., ECCV 2020): after training with
num_subcenters = K, each class's *dominant* sub-centre is the one most of its samples are
closest to; a sample more than --max-angle degrees (the paper: 75) from its class's
dominant sub-centre is probably mislabelled. CHECKPOINT is an output folder (its newest
complete checkpoint set), a set folder (checkpoints/step_N) or a merged file
(tools/partial_fc_shards.py merge); the set's rank files are merged over ranks. DATA is
the training set (RecordIO folder or image folder) the checkpoint was trained on.

OUT.csv has one row per listed sample, farthest first: index (the sample's position in
the data set), label, angle_deg, cos_dominant, nearest_subcentre, dominant_subcentre,
where (file or record). With --all every sample is written.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from _cli import UserError, run_main  # first: puts the repository on sys.path

COLUMNS = ["index", "label", "angle_deg", "cos_dominant", "nearest_subcentre", "dominant_subcentre", "where"]


def load_checkpoint(path: Path) -> dict:
    """One world-size-1 state (all class centres) from a set, its folder, or a merged file."""
    from losses.reshard import merge, saved_world_size
    from utils import checkpoint as ckpt

    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.is_file():
            state = ckpt.load_rank_file(path, mmap=True)
            if (state.get("world_size") or 1) != 1:
                raise UserError(f"{path} is one rank's file of a {state['world_size']}-rank set; pass the set's folder")
            return state
        if (path / ckpt.MANIFEST).is_file():
            sets = [s for s in ckpt.list_sets(path.parent.parent)[0] if s.path.resolve() == path.resolve()]
        else:
            sets = ckpt.candidate_sets(path)
        if not sets:
            raise UserError(
                f"{path} holds no complete checkpoint set (checkpoints/step_*/manifest.json or checkpoint_gpu_0.pt)"
            )
        cset = sets[0]
        states = [ckpt.load_rank_file(cset.rank_file(r), mmap=True) for r in range(saved_world_size(cset))]
        return merge(states, str(cset.path))
    except ckpt.CheckpointError as exc:
        raise UserError(str(exc)) from None


def _backbone(state: dict, network: str | None, where: str):
    from backbones import available_models, get_model
    from backbones.weights import WeightsError, load_state_dict_into, strip_wrapper_prefixes

    weights = state.get("state_dict_backbone")
    if not isinstance(weights, dict):
        raise UserError(f"{where} holds no backbone weights (state_dict_backbone): it is not rank 0's state")
    network = network or (state.get("run") or {}).get("network")
    if network is None:
        raise UserError(f"{where} does not say which network it trained; pass --network")
    if network not in available_models():
        raise UserError(f"unknown network {network!r}; valid networks: {', '.join(available_models())}")
    embedding_size = state["state_dict_softmax_fc"]["weight"].shape[1]
    model = get_model(network, num_features=embedding_size, dropout=0.0, fp16=False)
    try:
        load_state_dict_into(model, strip_wrapper_prefixes(weights), where, network)
    except WeightsError as exc:
        raise UserError(str(exc)) from None
    return model.eval()


def subcentre_report(state: dict, data: str, *, network=None, batch_size=256, num_workers=2, device="cpu",
                     where="checkpoint", progress=True) -> dict:
    """Per sample of `data`: label, its cosines to its class's K sub-centres, the nearest one;
    per class: the dominant sub-centre; per sample: the angle to it (degrees)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from dataset import DataError, open_dataset
    from losses.subcenter import angles_to_dominant, dominant_subcentres, own_class_cosines

    meta = state.get("partial_fc") or {}
    weight = state["state_dict_softmax_fc"]["weight"]
    k = int(meta.get("num_subcenters", 1))
    num_classes = int(meta.get("num_classes", weight.shape[0] // k))
    if k < 2:
        raise UserError(f"{where} was trained with one centre per class (num_subcenters=1): nothing to compare; "
                        f"train with num_subcenters > 1 (e.g. configs/ms1mv3_r50_subcenter.py)")
    model = _backbone(state, network, where).to(device)
    centres = weight.to(device)
    try:
        dataset = open_dataset(data, train=False, num_classes=num_classes)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        cosines, labels = [], []
        with torch.no_grad():
            for images, batch_labels in tqdm(loader, desc="embedding", unit="batch", disable=not progress):
                batch_labels = batch_labels.to(device)
                embeddings = model(images.to(device))
                cosines.append(own_class_cosines(embeddings, batch_labels, centres, k).cpu())
                labels.append(batch_labels.cpu())
    except DataError as exc:
        raise UserError(str(exc)) from None
    if not labels:
        raise UserError(f"data set {data} is empty")
    cosines, labels = torch.cat(cosines), torch.cat(labels)
    nearest = cosines.argmax(dim=1)
    dominant = dominant_subcentres(nearest, labels, num_classes, k)
    angles = angles_to_dominant(cosines, labels, dominant)
    return {"dataset": dataset, "labels": labels, "cosines": cosines, "nearest": nearest,
            "dominant": dominant, "angles": angles}


def write_csv(report: dict, path: Path, max_angle: float, everything: bool) -> int:
    """The listed samples, farthest first; returns how many."""
    import torch

    from utils.atomic_file import atomic_write

    angles = report["angles"]
    chosen = torch.arange(angles.numel()) if everything else torch.nonzero(angles > max_angle).squeeze(1)
    chosen = chosen[torch.argsort(angles[chosen], descending=True, stable=True)]
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(COLUMNS)
    labels, dominant = report["labels"], report["dominant"]
    for i in chosen.tolist():
        label = int(labels[i])
        d = int(dominant[label])
        out.writerow([i, label, f"{float(angles[i]):.3f}", f"{float(report['cosines'][i, d]):.6f}",
                      int(report["nearest"][i]), d, report["dataset"].where(i)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text.getvalue().encode())
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("checkpoint", type=Path, help="output folder, checkpoints/step_N folder or merged checkpoint file")
    parser.add_argument("data", help="the training set: RecordIO folder (train.rec + train.idx) or image folder")
    parser.add_argument("output", type=Path, help="the CSV to write")
    parser.add_argument("--max-angle", type=float, default=75.0, help="list samples farther than this (degrees; paper: 75)")
    parser.add_argument("--all", action="store_true", help="write every sample, not only those beyond --max-angle")
    parser.add_argument("--network", help="backbone name, if the checkpoint does not record it (insightface files)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    args = parser.parse_args(argv)
    if not 0.0 <= args.max_angle <= 180.0:
        raise UserError(f"--max-angle must be in [0, 180] degrees, got {args.max_angle}")
    if args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--batch-size must be positive and --num-workers non-negative")

    import torch

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    except RuntimeError:
        raise UserError(f"--device: unknown device {args.device!r} (auto, cpu, cuda, cuda:N)") from None
    state = load_checkpoint(args.checkpoint)
    report = subcentre_report(state, args.data, network=args.network, batch_size=args.batch_size,
                              num_workers=args.num_workers, device=device, where=str(args.checkpoint))
    written = write_csv(report, args.output, args.max_angle, args.all)
    total = report["angles"].numel()
    far = int((report["angles"] > args.max_angle).sum())
    print(f"{far} of {total} samples ({100.0 * far / total:.2f}%) are more than {args.max_angle:g} degrees from their "
          f"class's dominant sub-centre; {written} rows written to {args.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
