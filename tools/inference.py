#!/usr/bin/env python
"""Embed one or two face images; with two, print their cosine similarity.

    python tools/inference.py --network r50 --weight model.pt --img a.jpg b.jpg
    python tools/inference.py --weight model.onnx --img a.jpg --align x1 y1 x2 y2 ... x5 y5

Images should be aligned 112x112 crops. With --align, give 10 numbers per image
(left eye, right eye, nose, left and right mouth corner as x y) and the image is
aligned to the ArcFace template first. Other sizes without --align are resized,
with a warning.
"""
from __future__ import annotations

import argparse
import sys

from _cli import run_main  # first: puts the repository on sys.path

import cv2
import numpy as np

from eval.embedder import INPUT_SIZE, load_embedder
from eval.face_align import norm_crop
from utils.errors import UserError


def read_face(path: str, landmarks: np.ndarray | None) -> np.ndarray:
    """uint8 RGB [3, 112, 112]."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"cannot read image: {path}")
    if landmarks is not None:
        try:
            img = norm_crop(img, landmarks, INPUT_SIZE)
        except ValueError as e:
            raise UserError(f"{path}: cannot align: {e}") from None
    elif img.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
        print(
            f"warning: {path} is {img.shape[1]}x{img.shape[0]}, not an aligned 112x112 face; resizing "
            f"(pass --align with its 5 landmarks for a proper crop)",
            file=sys.stderr,
        )
        img = cv2.resize(img, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default=None, help="backbone name for a .pt state_dict, e.g. r50")
    parser.add_argument("--weight", required=True, help="model.pt (with --network) or model.onnx")
    parser.add_argument("--img", nargs="+", required=True, help="one or two images")
    parser.add_argument("--align", nargs="+", type=float, default=None, help="10 landmark numbers per image")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if len(args.img) > 2:
        raise UserError(f"--img takes one or two images, got {len(args.img)}")
    landmarks = [None] * len(args.img)
    if args.align is not None:
        if len(args.align) != 10 * len(args.img):
            raise UserError(
                f"--align needs 10 numbers per image ({10 * len(args.img)} for {len(args.img)} image(s)), "
                f"got {len(args.align)}"
            )
        landmarks = [np.array(args.align[10 * i : 10 * i + 10]).reshape(5, 2) for i in range(len(args.img))]

    faces = np.stack([read_face(p, lmk) for p, lmk in zip(args.img, landmarks)])
    embedder = load_embedder(args.weight, network=args.network, device=args.device)
    raw = embedder.embed(faces)
    normalised = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    with np.printoptions(precision=6, suppress=True, threshold=sys.maxsize, linewidth=100):
        for path, emb, r in zip(args.img, normalised, raw):
            print(f"{path}: embedding shape {emb.shape}, norm before normalisation {np.linalg.norm(r):.5g}")
            print(emb)
    if len(args.img) == 2:
        print(f"cosine similarity: {float(normalised[0] @ normalised[1]):.6f}")


if __name__ == "__main__":
    run_main(main)
