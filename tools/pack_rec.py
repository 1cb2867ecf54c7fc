"""Pack a folder of aligned faces (one sub-folder per identity) into train.rec / train.idx /
property in the insightface (MS1M) layout.

    python tools/pack_rec.py IMAGE_FOLDER OUT_DIR [--quality 95] [--workers N] [--reencode] [--resize]

Labels are the sorted sub-folder names' positions. JPEG files are stored byte for byte
(unless --reencode); other formats are encoded as JPEG at --quality. Every image is
decoded once to check it; one that is not 112x112 is an error unless --resize. Prints
the `num_classes` and `num_image` lines for the config. On any error nothing is left
in OUT_DIR.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

from _cli import run_main  # first: puts the repository on sys.path

import cv2
import numpy as np

from dataset.image_folder import list_image_folder
from dataset.recordio import write_identity_records
from utils.errors import UserError
from utils.progress import progress_bar

IMAGE_SIZE = (112, 112)  # height, width
OUTPUT_FILES = ("train.rec", "train.idx", "property")


def encode_image(path: str, quality: int, reencode: bool, resize: bool) -> tuple[bool, bytes | str]:
    """(True, bytes to store) or (False, error message) for one image file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return False, f"{path}: cannot read ({e.strerror})"
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        return False, f"{path}: not a decodable image"
    height, width = IMAGE_SIZE
    resized = image.shape[:2] != IMAGE_SIZE
    if resized:
        if not resize:
            return False, (
                f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected {width}x{height} aligned faces "
                f"(pass --resize to scale it)"
            )
        shrink = image.shape[0] > height or image.shape[1] > width
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if data[:3] == b"\xff\xd8\xff" and not (reencode or resized):
        return True, data
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV's JPEG encoder does not fail on valid arrays
        return False, f"{path}: JPEG encoding failed"
    return True, encoded.tobytes()


def _encode_task(task: tuple[str, int, bool, bool]) -> tuple[bool, bytes | str]:
    return encode_image(*task)


def _identities(results, counts: list[int], bar):
    """Regroup the ordered per-image results into one list of encoded images per identity."""
    for count in counts:
        images = []
        for _ in range(count):
            ok, value = next(results)
            if not ok:
                raise UserError(value)
            images.append(value)
        bar.update(count)
        yield images


def pack_folder(
    image_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quality: int = 95,
    workers: int = 1,
    reencode: bool = False,
    resize: bool = False,
    overwrite: bool = False,
) -> tuple[int, int]:
    """Pack `image_folder` into `out_dir`; returns (num_classes, num_images)."""
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {quality}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    listing = list_image_folder(image_folder)
    out = Path(out_dir)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite or choose another OUT_DIR")
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT_DIR {out} exists and is not a folder")
    created = not out.exists()
    tasks = [(path, quality, reencode, resize) for group in listing.files for path in group]
    counts = [len(group) for group in listing.files]
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    bar = progress_bar(total=len(tasks), desc="packing")
    try:
        results = (
            pool.imap(_encode_task, tasks, chunksize=max(1, min(64, len(tasks) // (8 * workers))))
            if pool
            else map(_encode_task, tasks)
        )
        return write_identity_records(out, _identities(iter(results), counts, bar), image_size=IMAGE_SIZE)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_folder", metavar="IMAGE_FOLDER", help="folder with one sub-folder of images per identity")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where train.rec, train.idx and property are written")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for images that are (re-)encoded")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    parser.add_argument("--reencode", action="store_true", help="re-encode JPEG files too instead of copying them")
    parser.add_argument("--resize", action="store_true", help="scale images that are not 112x112")
    parser.add_argument("--overwrite", action="store_true", help="replace train.rec/train.idx/property in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        num_classes, num_images = pack_folder(
            args.image_folder, args.out_dir, quality=args.quality, workers=args.workers,
            reencode=args.reencode, resize=args.resize, overwrite=args.overwrite,
        )
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"num_classes = {num_classes}")
    print(f"num_image = {num_images}")
    return 0


if __name__ == "__main__":
    run_main(main)
