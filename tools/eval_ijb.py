#!/usr/bin/env python
"""IJB-B / IJB-C 1:1 verification (template-to-template TAR at FAR 1e-6 ... 1e-1).

    python tools/eval_ijb.py --model model.pt --network r50 --image-path IJB_release/IJBC \\
        --target IJBC --result-dir results/ --use-flip --use-detector-score

IMAGE_PATH holds the release layout: `loose_crop/*.jpg` and
`meta/<t>_name_5pts_score.txt` (name, 10 landmark numbers, detector score),
`meta/<t>_face_tid_mid.txt` (name, template id, media id),
`meta/<t>_template_pair_label.txt` (template 1, template 2, label), t = ijbc/ijbb.

Every face is aligned with its five landmarks and embedded (plus its mirror image
with --use-flip, the two embeddings summed; times its detector score with
--use-detector-score). A template is the sum over its medias of the mean
embedding within each media, L2-normalised; a pair's score is the cosine of its
two templates. Writes <t>.npy (scores in pair-file order), <t>_tar_at_far.txt,
<t>_roc.png and <t>_roc.csv (the ROC's corner points: fpr, tpr, threshold, exact
and small enough to re-plot several models together) into RESULT_DIR.
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from _cli import run_main  # first: puts the repository on sys.path

import cv2
import numpy as np
import torch

from utils.errors import UserError
from utils.progress import progress_bar

FAR_LEVELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PAIR_CHUNK = 1 << 20  # pairs scored at once: bounds the temporary [chunk, D] arrays


# ---------------------------------------------------------------------------------------------
# Meta files


def read_face_list(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`<t>_name_5pts_score.txt` -> (names, landmarks [N,5,2], detector scores [N])."""
    names, values = [], []
    with open(path, "r") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 12:
                raise UserError(f"{path}:{lineno}: expected 'name x1 y1 ... x5 y5 score' (12 fields), got {len(fields)}")
            try:
                values.append([float(v) for v in fields[1:]])
            except ValueError:
                raise UserError(f"{path}:{lineno}: landmarks and score must be numbers: {line.strip()!r}") from None
            names.append(fields[0])
    if not names:
        raise UserError(f"{path}: no faces listed")
    arr = np.asarray(values, dtype=np.float32)
    return names, arr[:, :10].reshape(-1, 5, 2), arr[:, 10]


def read_template_media(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`<t>_face_tid_mid.txt` -> (names, template ids, media ids)."""
    names, tids, mids = [], [], []
    with open(path, "r") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise UserError(f"{path}:{lineno}: expected 'name template_id media_id', got {line.strip()!r}")
            try:
                tids.append(int(fields[1]))
                mids.append(int(fields[2]))
            except ValueError:
                raise UserError(f"{path}:{lineno}: template and media ids must be integers: {line.strip()!r}") from None
            names.append(fields[0])
    if not names:
        raise UserError(f"{path}: no faces listed")
    return names, np.asarray(tids, dtype=np.int64), np.asarray(mids, dtype=np.int64)


def read_template_pairs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`<t>_template_pair_label.txt` -> (template 1, template 2, label 0/1)."""
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise UserError(f"{path}: expected lines 'template1 template2 label' of integers ({e})") from None
    if table.shape[0] == 0 or table.shape[1] != 3:
        raise UserError(f"{path}: expected lines 'template1 template2 label', got {table.shape[1]} columns")
    labels = table[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise UserError(f"{path}:{bad[0] + 1}: label must be 0 or 1, got {labels[bad[0]]}")
    return table[:, 0], table[:, 1], labels


def face_rows(face_names: Sequence[str], member_names: Sequence[str], face_list: str, media_list: str) -> np.ndarray:
    """For each line of the template/media list, the row of the same image in the landmark list."""
    if list(face_names) == list(member_names):
        return np.arange(len(face_names))
    row_of = {name: i for i, name in enumerate(face_names)}
    if len(row_of) != len(face_names):
        raise UserError(f"{face_list}: image names repeat, and the line order differs from {media_list}")
    rows = np.empty(len(member_names), dtype=np.int64)
    for i, name in enumerate(member_names):
        if name not in row_of:
            raise UserError(f"{media_list}:{i + 1}: image {name} has no landmarks in {face_list}")
        rows[i] = row_of[name]
    return rows


# ---------------------------------------------------------------------------------------------
# Features


def _load_aligned(path: str, landmarks: np.ndarray) -> np.ndarray:
    from eval.face_align import norm_crop

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"cannot read image: {path}")
    try:
        face = norm_crop(img, landmarks, 112)
    except ValueError as e:
        raise UserError(f"{path}: cannot align: {e}") from None
    return np.ascontiguousarray(face[:, :, ::-1].transpose(2, 0, 1))  # RGB, CHW


def embed_faces(
    image_dir: str,
    names: Sequence[str],
    landmarks: np.ndarray,
    embedder,
    batch_size: int,
    use_flip: bool,
    workers: int = 4,
    label: str = "embedding",
) -> np.ndarray:
    """Raw embeddings [N, D] of the aligned faces (image + mirror image when use_flip).

    Images are read and aligned by a thread pool (OpenCV releases the GIL), one batch
    ahead of the model.
    """
    paths = [os.path.join(image_dir, n) for n in names]
    missing = next((p for p in paths if not os.path.isfile(p)), None)
    if missing is not None:
        raise UserError(f"image not found: {missing}")
    starts = list(range(0, len(paths), batch_size))
    chunks = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, progress_bar(total=len(paths), desc=label) as bar:

        def submit(start):
            stop = min(start + batch_size, len(paths))
            return [pool.submit(_load_aligned, paths[i], landmarks[i]) for i in range(start, stop)]

        pending = submit(starts[0])
        for k in range(len(starts)):
            upcoming = submit(starts[k + 1]) if k + 1 < len(starts) else []
            faces = np.stack([f.result() for f in pending])
            if use_flip:
                both = embedder.embed(np.concatenate([faces, np.ascontiguousarray(faces[:, :, :, ::-1])]))
                chunks.append(both[: len(faces)] + both[len(faces) :])
            else:
                chunks.append(embedder.embed(faces))
            bar.update(len(faces))
            pending = upcoming
    return np.concatenate(chunks).astype(np.float32, copy=False)


def template_features(
    features: np.ndarray, template_ids: np.ndarray, media_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids, L2-normalised template features [T, D]).

    Within a template the faces of one media (frames of one video, or one still) are
    averaged, so a long video counts as much as a single photo; the media means are summed.
    """
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    keys = np.stack([template_ids, media_ids], axis=1)
    groups, group_of_face, faces_per_group = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    media_sum = torch.zeros(len(groups), feats.shape[1]).index_add_(0, torch.from_numpy(group_of_face.ravel()), feats)
    media_mean = media_sum / torch.from_numpy(faces_per_group).unsqueeze(1).float()
    templates, template_of_group = np.unique(groups[:, 0], return_inverse=True)
    template_sum = torch.zeros(len(templates), feats.shape[1]).index_add_(
        0, torch.from_numpy(template_of_group.ravel()), media_mean
    )
    return templates, torch.nn.functional.normalize(template_sum, dim=1).numpy()


def pair_scores(
    templates: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray, pair_file: str = "pairs"
) -> np.ndarray:
    """Cosine similarity of each template pair (float32, in pair order)."""
    rows = []
    for ids in (t1, t2):
        idx = np.searchsorted(templates, ids).clip(max=len(templates) - 1)
        unknown = np.flatnonzero(templates[idx] != ids)
        if unknown.size:
            raise UserError(f"{pair_file}:{unknown[0] + 1}: template {ids[unknown[0]]} has no faces")
        rows.append(idx)
    scores = np.empty(len(t1), dtype=np.float32)
    for start in range(0, len(t1), PAIR_CHUNK):
        a = template_feats[rows[0][start : start + PAIR_CHUNK]]
        b = template_feats[rows[1][start : start + PAIR_CHUNK]]
        scores[start : start + PAIR_CHUNK] = np.einsum("ij,ij->i", a, b)
    return scores


# ---------------------------------------------------------------------------------------------
# ROC


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, a pair accepted when score >= threshold;
    starts at (0, 0) with threshold +inf."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"an ROC needs genuine and impostor pairs; got {n_pos} genuine and {n_neg} impostor")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tps = np.cumsum(sorted_labels)[last_of_each_score]
    fps = (last_of_each_score + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, sorted_scores[last_of_each_score]]
    return fpr, tpr, thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far_levels: Sequence[float] = FAR_LEVELS) -> np.ndarray:
    """TAR at the ROC point whose FAR is nearest to each level (the highest such point on ties),
    the convention of insightface's IJB tables."""
    out = []
    for level in far_levels:
        distance = np.abs(fpr - level)
        nearest = len(distance) - 1 - int(np.argmin(distance[::-1]))
        out.append(float(tpr[nearest]))
    return np.asarray(out)


def roc_corners(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Indices of the ROC points where the curve turns: the same piecewise-linear curve
    without the points inside straight vertical or horizontal runs.

    An ROC over millions of impostor pairs has millions of points, but between two
    genuine pairs it only runs right: the corners are about twice the genuine count, and
    interpolating them gives the curve's TPR at any FAR. (The TAR@FAR table, which takes
    the nearest measured point, is computed from the full curve.)
    """
    dx, dy = np.diff(fpr), np.diff(tpr)
    # Direction of each segment: 1 up, 2 right, 3 both (tied scores), 0 none.
    direction = (dy > 0).astype(np.int8) + 2 * (dx > 0).astype(np.int8)
    turns = (direction[1:] != direction[:-1]) | (direction[1:] == 3)
    return np.flatnonzero(np.r_[True, turns, True]) if len(fpr) > 1 else np.arange(len(fpr))


def roc_for_plot(fpr: np.ndarray, tpr: np.ndarray, lowest_far: float = 1e-7, points: int = 2000):
    """The ROC step curve sampled at log-spaced FARs (millions of pairs give millions of points)."""
    grid = np.logspace(np.log10(lowest_far), 0, points)
    idx = np.searchsorted(fpr, grid, side="right") - 1
    return grid, tpr[idx]


# ---------------------------------------------------------------------------------------------


def format_table(name: str, tars: Sequence[float], far_levels: Sequence[float] = FAR_LEVELS) -> str:
    header = f"{'TAR (%) @ FAR':<20}" + "".join(f"{level:>9.0e}" for level in far_levels)
    return header + "\n" + f"{name:<20}" + "".join(f"{100 * t:>9.2f}" for t in tars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .pt/.pth state_dict (with --network) or an .onnx file")
    parser.add_argument("--network", default=None, help="backbone name for a state_dict, e.g. r50")
    parser.add_argument("--image-path", required=True, help="IJB folder with loose_crop/ and meta/")
    parser.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    parser.add_argument("--result-dir", required=True)
    parser.add_argument("--use-detector-score", action="store_true", help="weight each face by its detector score")
    parser.add_argument("--use-flip", action="store_true", help="add the embedding of the mirrored face")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image loading threads")
    args = parser.parse_args()

    from utils.atomic_file import atomic_write
    from eval.embedder import load_embedder
    from eval.plot import line_plot, write_csv

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    t = args.target.lower()
    meta = os.path.join(args.image_path, "meta")
    face_list = os.path.join(meta, f"{t}_name_5pts_score.txt")
    media_list = os.path.join(meta, f"{t}_face_tid_mid.txt")
    pair_list = os.path.join(meta, f"{t}_template_pair_label.txt")
    image_dir = os.path.join(args.image_path, "loose_crop")
    for path in (face_list, media_list, pair_list):
        if not os.path.isfile(path):
            raise UserError(f"{args.target} meta file not found: {path}")
    if not os.path.isdir(image_dir):
        raise UserError(f"image folder not found: {image_dir}")
    os.makedirs(args.result_dir, exist_ok=True)

    names, landmarks, detector_scores = read_face_list(face_list)
    member_names, template_ids, media_ids = read_template_media(media_list)
    rows = face_rows(names, member_names, face_list, media_list)
    t1, t2, labels = read_template_pairs(pair_list)
    print(f"{args.target}: {len(names)} faces, {len(np.unique(template_ids))} templates, {len(labels)} pairs")

    embedder = load_embedder(args.model, network=args.network, device=args.device, batch_size=args.batch_size)
    features = embed_faces(
        image_dir, names, landmarks, embedder, args.batch_size, args.use_flip, args.workers, f"{args.target}: embedding"
    )
    if args.use_detector_score:
        features = features * detector_scores[:, None]
    templates, template_feats = template_features(features[rows], template_ids, media_ids)
    scores = pair_scores(templates, template_feats, t1, t2, pair_list)

    fpr, tpr, thresholds = roc_curve(labels, scores)
    tars = tar_at_far(fpr, tpr)
    model_name = os.path.splitext(os.path.basename(args.model))[0]
    table = format_table(f"{model_name}-{args.target}", tars)
    print(table)

    with atomic_write(os.path.join(args.result_dir, f"{t}.npy")) as f:
        np.save(f, scores)
    with atomic_write(os.path.join(args.result_dir, f"{t}_tar_at_far.txt")) as f:
        f.write((table + "\n").encode())
    auc = float(np.trapezoid(tpr, fpr))
    xs, ys = roc_for_plot(fpr, tpr)
    line_plot(
        os.path.join(args.result_dir, f"{t}_roc.png"),
        {f"{model_name} (AUC = {100 * auc:.2f}%)": (xs, ys)},
        title=f"ROC on {args.target}",
        xlabel="False Positive Rate",
        ylabel="True Positive Rate",
        logx=True,
        xlim=(1e-6, 1e-1),
        ylim=(min(0.3, np.floor(10 * tars[0]) / 10), 1.0),
    )
    corners = roc_corners(fpr, tpr)
    write_csv(os.path.join(args.result_dir, f"{t}_roc.csv"),
              {"fpr": fpr[corners], "tpr": tpr[corners], "threshold": thresholds[corners]})
    print(f"scores, table and ROC (png, csv) written to {args.result_dir}")


if __name__ == "__main__":
    run_main(main)
