#!/usr/bin/env python
"""Embed one or two face images (with two, print their cosine similarity), or every
image of a folder into one file.

    python tools/inference.py --network r50 --weight model.pt --img a.jpg b.jpg
    python tools/inference.py --weight model.onnx --img a.jpg --align x1 y1 x2 y2 ... x5 y5
    python tools/inference.py --network r50 --weight model.pt --folder faces/ --output faces.npz

Images should be aligned 112x112 crops. With --align, give 10 numbers per image
(left eye, right eye, nose, left and right mouth corner as x y) and the image is
aligned to the ArcFace template first. Other sizes without --align are resized,
with a warning.

--folder embeds every image below the folder (sub-folders included, in sorted
order) and writes an .npz with `names` (paths relative to the folder),
`embeddings` (L2-normalised, float32 [N, D]) and `norms` (the norms before
normalisation, a quality signal).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from _cli import run_main  # first: puts the repository on sys.path

import cv2
import numpy as np

from dataset.image_folder import is_image_file
from eval.embedder import INPUT_SIZE, load_embedder
from eval.face_align import norm_crop
from utils.atomic_file import atomic_write
from utils.errors import UserError
from utils.progress import progress_bar


def _decode(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"cannot read image: {path}")
    return img


def _to_rgb_chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))


def read_face(path: str, landmarks: np.ndarray | None) -> np.ndarray:
    """uint8 RGB [3, 112, 112]."""
    img = _decode(path)
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
    return _to_rgb_chw(img)


def list_images(folder: str) -> list[str]:
    """Image files below `folder` (hidden entries skipped), relative paths in sorted order."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names += [os.path.relpath(os.path.join(root, f), folder) for f in files if not f.startswith(".") and is_image_file(f)]
    if not names:
        raise UserError(f"{folder}: no image files found")
    return sorted(names)


def _folder_face(path: str) -> tuple[np.ndarray, bool]:
    """(uint8 RGB [3, 112, 112], whether it had to be resized)."""
    img = _decode(path)
    resized = img.shape[:2] != (INPUT_SIZE, INPUT_SIZE)
    if resized:
        img = cv2.resize(img, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    return _to_rgb_chw(img), resized


def embed_folder(folder: str, embedder, batch_size: int, workers: int) -> tuple[list[str], np.ndarray]:
    """(relative names, raw embeddings [N, D]) of every image below `folder`. A thread pool
    decodes the next batch (OpenCV releases the GIL) while the model embeds this one."""
    names = list_images(folder)
    chunks, resized = [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, progress_bar(total=len(names), desc="embedding") as bar:

        def submit(start):  # one batch ahead, so memory stays at two batches whatever the folder holds
            return [pool.submit(_folder_face, os.path.join(folder, n)) for n in names[start : start + batch_size]]

        pending = submit(0)
        for start in range(0, len(names), batch_size):
            upcoming = submit(start + batch_size)
            batch = [f.result() for f in pending]
            resized += [names[start + i] for i, (_, was_resized) in enumerate(batch) if was_resized]
            chunks.append(embedder.embed(np.stack([face for face, _ in batch])))
            bar.update(len(batch))
            pending = upcoming
    if resized:
        print(f"warning: {len(resized)} of {len(names)} images were not 112x112 and were resized "
              f"(first: {resized[0]}); align faces first for reliable embeddings", file=sys.stderr)
    return names, np.concatenate(chunks).astype(np.float32, copy=False)


def _normalised(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(raw, axis=1)
    return raw / np.maximum(norms, 1e-12)[:, None], norms


def _pair_mode(args) -> None:
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
    normalised, norms = _normalised(embedder.embed(faces))
    with np.printoptions(precision=6, suppress=True, threshold=sys.maxsize, linewidth=100):
        for path, emb, norm in zip(args.img, normalised, norms):
            print(f"{path}: embedding shape {emb.shape}, norm before normalisation {norm:.5g}")
            print(emb)
    if len(args.img) == 2:
        print(f"cosine similarity: {float(normalised[0] @ normalised[1]):.6f}")


def _folder_mode(args) -> None:
    if args.output is None:
        raise UserError("--folder needs --output, the .npz file to write")
    if args.align is not None:
        raise UserError("--align takes landmarks per --img image; a --folder must hold aligned faces")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    embedder = load_embedder(args.weight, network=args.network, device=args.device, batch_size=args.batch_size)
    names, raw = embed_folder(args.folder, embedder, args.batch_size, args.workers)
    embeddings, norms = _normalised(raw)
    with atomic_write(args.output) as f:
        np.savez(f, names=np.array(names), embeddings=embeddings, norms=norms.astype(np.float32))
    print(f"wrote {args.output}: {len(names)} embeddings of size {embeddings.shape[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default=None, help="backbone name for a .pt state_dict, e.g. r50")
    parser.add_argument("--weight", required=True, help="model.pt (with --network) or model.onnx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--img", nargs="+", help="one or two images")
    source.add_argument("--folder", help="embed every image below this folder (with --output)")
    parser.add_argument("--align", nargs="+", type=float, default=None, help="10 landmark numbers per image")
    parser.add_argument("--output", default=None, help="with --folder: the .npz file to write")
    parser.add_argument("--batch-size", type=int, default=64, help="with --folder: images per forward pass")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.folder is not None:
        _folder_mode(args)
    else:
        _pair_mode(args)


if __name__ == "__main__":
    run_main(main)
