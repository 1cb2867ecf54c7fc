#!/usr/bin/env python
"""Pack a folder of face images and a pairs list into a verification `.bin`.

    python tools/pack_bin.py IMAGE_FOLDER PAIRS_TXT OUT.bin

PAIRS_TXT: one pair per line, `relpath1 relpath2 1|0` (1 = same person), paths
relative to IMAGE_FOLDER; blank lines and lines starting with '#' are skipped.
JPEG files are stored byte for byte; other formats are decoded and stored as PNG
(lossless). The result loads with dataset.verification_bin.load_bin and insightface.
"""
from __future__ import annotations

import argparse
import os

from _cli import run_main  # first: puts the repository on sys.path

import cv2
import numpy as np

from dataset.verification_bin import write_bin
from utils.errors import UserError
from utils.progress import progress_bar

JPEG_MAGIC = b"\xff\xd8\xff"


def read_pairs(pairs_txt: str) -> list[tuple[str, str, bool]]:
    pairs = []
    with open(pairs_txt, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split()
            if len(fields) != 3 or fields[2] not in ("0", "1"):
                raise UserError(f"{pairs_txt}:{lineno}: expected 'relpath1 relpath2 1|0', got {text!r}")
            pairs.append((fields[0], fields[1], fields[2] == "1"))
    if not pairs:
        raise UserError(f"{pairs_txt}: no pairs found")
    return pairs


def encoded_image(path: str) -> bytes:
    """The bytes to store for one image: JPEG unchanged, anything else re-encoded as PNG."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise UserError(f"{path}: not a readable image")
    if data.startswith(JPEG_MAGIC):
        return data
    ok, png = cv2.imencode(".png", decoded)
    if not ok:
        raise UserError(f"{path}: PNG encoding failed")
    return png.tobytes()


def pack(image_folder: str, pairs_txt: str, out_path: str) -> int:
    if not os.path.isdir(image_folder):
        raise UserError(f"image folder not found: {image_folder}")
    pairs = read_pairs(pairs_txt)
    cache: dict[str, bytes] = {}  # an image may appear in many pairs; read it once
    images, issame = [], []
    for rel1, rel2, same in progress_bar(pairs, desc="packing", unit="pair"):
        for rel in (rel1, rel2):
            if rel not in cache:
                cache[rel] = encoded_image(os.path.join(image_folder, rel))
            images.append(cache[rel])
        issame.append(same)
    write_bin(out_path, images, issame)
    return len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_folder")
    parser.add_argument("pairs_txt")
    parser.add_argument("out_bin")
    args = parser.parse_args()
    n = pack(args.image_folder, args.pairs_txt, args.out_bin)
    print(f"wrote {args.out_bin}: {n} pairs, {2 * n} images")


if __name__ == "__main__":
    run_main(main)
