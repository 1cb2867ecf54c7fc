#!/usr/bin/env python
"""Accuracy of a trained model on verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

    python tools/eval_verification.py work_dirs/ms1mv3_r50/model.pt --network r50 \\
        --bins data/lfw.bin data/cfp_fp.bin data/agedb_30.bin
    python tools/eval_verification.py model.onnx --bins lfw.bin

Same protocol as the in-training evaluation: image + flip, 10 folds, accuracy
mean +- std over folds, XNorm, VAL at FAR=1e-3.
"""
from __future__ import annotations

import argparse
import os

from _cli import run_main  # first: puts the repository on sys.path

import torch

from dataset.verification_bin import load_bin
from eval.embedder import load_embedder
from eval.verification import embed_verification_set, evaluate
from utils.errors import UserError
from utils.progress import progress_bar


def evaluate_bins(model_path: str, bins: list[str], network: str | None, batch_size: int, device: str) -> list[dict]:
    embedder = load_embedder(model_path, network=network, device=device, batch_size=batch_size)
    rows = []
    for path in bins:
        name = os.path.splitext(os.path.basename(path))[0]
        data_list, issame = load_bin(path)
        with progress_bar(total=data_list[0].shape[0], desc=f"{name}: embedding") as bar:
            embeddings, xnorm = embed_verification_set(data_list, embedder, batch_size, progress=bar.update)
        try:
            result = evaluate(embeddings, issame)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        rows.append(
            dict(
                set=name, pairs=len(issame), acc=result.accuracy, std=result.accuracy_std,
                xnorm=xnorm, val=result.val, val_std=result.val_std, far=result.far,
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'set':<16} {'pairs':>6}  {'accuracy (%)':>16}  {'XNorm':>10}  {'VAL@FAR=1e-3 (%)':>22}"
    lines = [header, "-" * len(header)]
    for r in rows:
        acc = f"{100 * r['acc']:.3f} +- {100 * r['std']:.3f}"
        val = f"{100 * r['val']:.2f} +- {100 * r['val_std']:.2f} @{r['far']:.5f}"
        lines.append(f"{r['set']:<16} {r['pairs']:>6}  {acc:>16}  {r['xnorm']:>10.5g}  {val:>22}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .pt/.pth state_dict (with --network) or an .onnx file")
    parser.add_argument("--bins", nargs="+", required=True, help="verification .bin files")
    parser.add_argument("--network", default=None, help="backbone name for a state_dict, e.g. r50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    missing = [p for p in args.bins if not os.path.isfile(p)]
    if missing:
        raise UserError(f"verification set not found: {missing[0]}")
    rows = evaluate_bins(args.model, args.bins, args.network, args.batch_size, args.device)
    print(format_table(rows))


if __name__ == "__main__":
    run_main(main)
