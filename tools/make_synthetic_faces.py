#!/usr/bin/env python
"""Draw the synthetic-faces data set (what `make demo` trains on) into a folder.

    python tools/make_synthetic_faces.py OUT_DIR [--identities 300] [--images-per-identity 16] ...

Writes train.rec / train.idx / property (MS1M layout), synthetic_val.bin (pairs of
held-out identities) and preview.png (one row per identity, one column per photo) so
you can look at the faces. Train on it with `--rec=OUT_DIR --val_targets="['synthetic_val']"`,
or set `synthetic_faces` in a config to have train.py draw it (configs/demo.py).
A folder that already holds the same set is left as it is.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from _cli import run_main  # first: puts the repository on sys.path

import cv2
import numpy as np

from dataset.synthetic_faces import VAL_NAME, identity_images, materialize
from utils.atomic_file import atomic_write

PREVIEW_ROWS, PREVIEW_COLS = 8, 8


def preview_grid(seed: int, rows: int, cols: int, variation: float = 1.0) -> np.ndarray:
    """BGR image: row i holds the first `cols` training photos of identity i (as drawn, before JPEG)."""
    return np.concatenate(
        [np.concatenate(identity_images(seed, i, cols, variation=variation), axis=1) for i in range(rows)], axis=0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--identities", type=int, default=300, help="training identities")
    parser.add_argument("--images-per-identity", type=int, default=16)
    parser.add_argument("--val-identities", type=int, default=100, help="held-out identities of the verification set")
    parser.add_argument("--val-pairs", type=int, default=600, help="verification pairs (even: half same, half different)")
    parser.add_argument("--val-photos-per-identity", type=int, default=None,
                        help="photos per held-out identity that the pairs share (default: a photo of its own in every place)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--variation", type=float, default=1.0, help="scale of the per-photo changes (0: none, 2: double)")
    parser.add_argument("--workers", type=int, default=None, help="drawing processes (default: CPU count, at most 8)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    materialize(
        args.out_dir, num_identities=args.identities, images_per_identity=args.images_per_identity,
        num_val_identities=args.val_identities, num_val_pairs=args.val_pairs, seed=args.seed,
        quality=args.quality, variation=args.variation, val_photos_per_identity=args.val_photos_per_identity,
        workers=args.workers,
    )
    preview = os.path.join(args.out_dir, "preview.png")
    grid = preview_grid(args.seed, min(PREVIEW_ROWS, args.identities), min(PREVIEW_COLS, args.images_per_identity),
                        args.variation)
    ok, png = cv2.imencode(".png", grid)
    if not ok:  # pragma: no cover - PNG encoding of a uint8 image does not fail
        raise RuntimeError("PNG encoding of the preview failed")
    with atomic_write(preview) as f:
        f.write(png.tobytes())
    print(f"{args.out_dir}: train.rec/train.idx/property ({args.identities} identities x {args.images_per_identity} "
          f"images), {VAL_NAME}.bin ({args.val_pairs} pairs of {args.val_identities} held-out identities), "
          f"preview.png")


if __name__ == "__main__":
    run_main(main)
