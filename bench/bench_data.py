"""Data-loading throughput on a generated RecordIO set of 112x112 JPEGs (quality 95).

Measures, in images per second per worker process:
  (i)   the limit: read each record and cv2.imdecode its JPEG (nothing else),
  (ii)  MXFaceDataset.__getitem__ (read, decode, RGB, flip, normalise to float32),
  (ii') MXFaceDataset.load_batch, what a DataLoader worker runs (read, decode, RGB, flip
        into a uint8 batch; the float conversion happens on the training device),
  (iii) the training DataLoader on the CPU with 0, 1, 2 workers (whole batches, normalised).
The goal is a worker's rate (ii') >= 85% of (i).

    python bench/bench_data.py [--num-images 3000] [--batch-size 64] [--workers 0 1 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

import cv2
import numpy as np
import torch


def make_jpegs(num_images: int, num_classes: int, seed: int = 0, quality: int = 95) -> list[list[bytes]]:
    """Smooth random colour fields with mild noise: JPEG sizes close to real aligned faces."""
    rng = np.random.default_rng(seed)
    identities: list[list[bytes]] = [[] for _ in range(num_classes)]
    for i in range(num_images):
        coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.float32)
        image = cv2.resize(coarse, (112, 112), interpolation=cv2.INTER_CUBIC)
        image += rng.normal(0, 6, size=image.shape).astype(np.float32)
        ok, encoded = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        identities[i % num_classes].append(encoded.tobytes())
    return identities


def _rate(fn, count: int, rounds: int, clock=time.perf_counter) -> float:
    """Best images/s over `rounds` runs of fn() (which processes `count` images)."""
    best = 0.0
    for _ in range(rounds):
        start = clock()
        fn()
        best = max(best, count / (clock() - start))
    return best


def run(
    num_images: int = 3000,
    *,
    num_classes: int = 100,
    batch_size: int = 64,
    workers: tuple[int, ...] = (0, 1, 2),
    rounds: int = 3,
    work_dir: str | None = None,
) -> dict:
    from dataset import IndexedRecordReader, MXFaceDataset, get_dataloader, write_identity_records
    from dataset.recordio import parse_header

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        identities = make_jpegs(num_images, num_classes)
        write_identity_records(tmp, identities)
        payloads = [jpeg for group in identities for jpeg in group]
        reader = IndexedRecordReader(Path(tmp) / "train.rec", Path(tmp) / "train.idx")
        keys = list(range(1, num_images + 1))
        buffers = [np.frombuffer(p, dtype=np.uint8) for p in payloads]

        def decode_only():
            for buf in buffers:
                cv2.imdecode(buf, cv2.IMREAD_COLOR)

        def read_and_decode():
            for key in keys:
                data = reader.read(key)
                _, start = parse_header(data)
                cv2.imdecode(np.frombuffer(data, dtype=np.uint8, offset=start), cv2.IMREAD_COLOR)

        dataset = MXFaceDataset(tmp, train=True)

        def getitem():
            for i in range(len(dataset)):
                dataset[i]

        batches = [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]

        def worker_batches():  # what a DataLoader worker does: uint8 batches, float on the device
            for indices in batches:
                dataset.load_batch(indices, 0)

        # Single-process paths: CPU time of this process (robust when other processes share the
        # cores), interleaved so that any remaining disturbance hits all of them alike.
        decode_rate = read_rate = item_rate = batch_rate = 0.0
        for _ in range(rounds):
            decode_rate = max(decode_rate, _rate(decode_only, num_images, 1, time.process_time))
            read_rate = max(read_rate, _rate(read_and_decode, num_images, 1, time.process_time))
            item_rate = max(item_rate, _rate(getitem, num_images, 1, time.process_time))
            batch_rate = max(batch_rate, _rate(worker_batches, num_images, 1, time.process_time))

        loader_rates = {}
        for w in workers:
            loader = get_dataloader(tmp, 0, batch_size, seed=1, num_workers=w, device="cpu")
            images_per_epoch = len(loader) * batch_size

            def epoch():
                for _ in loader:
                    pass

            epoch()  # starts the (persistent) workers
            rate = _rate(epoch, images_per_epoch, max(1, rounds - 1))
            loader_rates[w] = {"img_s": rate, "img_s_per_worker": rate / max(w, 1)}
            del loader
        reader.close()
    return {
        "num_images": num_images,
        "mean_jpeg_bytes": float(np.mean([len(p) for p in payloads])),
        "decode_only_img_s": decode_rate,
        "raw_read_decode_img_s": read_rate,
        "getitem_img_s": item_rate,
        "getitem_vs_raw": item_rate / read_rate,
        "worker_batch_img_s": batch_rate,
        "worker_vs_raw": batch_rate / read_rate,
        "loader": loader_rates,
    }


def format_table(result: dict) -> str:
    rows = [
        ("cv2.imdecode only (payloads in memory)", result["decode_only_img_s"], ""),
        ("(i) read record + cv2.imdecode (the limit)", result["raw_read_decode_img_s"], "100%"),
        ("(ii) MXFaceDataset.__getitem__ (single sample, float32)", result["getitem_img_s"],
         f"{100 * result['getitem_vs_raw']:.1f}%"),
    ]
    if "worker_batch_img_s" in result:
        rows.append(("(ii') MXFaceDataset.load_batch (a loader worker's job: uint8 batches)",
                     result["worker_batch_img_s"], f"{100 * result['worker_vs_raw']:.1f}%"))
    for w, r in result["loader"].items():
        rows.append((f"(iii) DataLoader, {w} workers (per worker)", r["img_s_per_worker"], f"total {r['img_s']:.0f}"))
    lines = [
        f"{result['num_images']} JPEGs 112x112 q95, mean {result['mean_jpeg_bytes']:.0f} bytes",
        "",
        "(i), (ii), (ii'): CPU time of one process; (iii): wall clock, total / workers (0 workers: the main process)",
        "",
        "| path | img/s per process | note |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {name} | {rate:.0f} | {note} |" for name, rate, note in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.num_images, batch_size=args.batch_size, workers=tuple(args.workers), rounds=args.rounds)
    print(format_table(result))


if __name__ == "__main__":
    main()
