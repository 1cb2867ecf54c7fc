"""Verification: insightface's 10-fold protocol and embedding a verification set.

`evaluate()` reproduces insightface's protocol (10 contiguous folds, best
threshold on the other nine, VAL@FAR=1e-3) with counting by binary search
instead of a Python loop over thresholds. The `.bin` file format is
`dataset.verification_bin`.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from backbones.folding import fold_batchnorm
from dataset.transforms import normalize_batch

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3

# ---------------------------------------------------------------------------------------------
# Scoring


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype).tiny)


def _count_accepted(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold t: (# same pairs with dist < t, # different pairs with dist < t)."""
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    # searchsorted(side="left") counts the elements strictly below t: the "<" of the protocol.
    return np.searchsorted(same, thresholds, side="left"), np.searchsorted(diff, thresholds, side="left")


def _ratio(num: np.ndarray, den: int) -> np.ndarray:
    return num / den if den > 0 else np.zeros(np.shape(num), dtype=np.float64)


def _contiguous_folds(n: int, n_folds: int) -> list[np.ndarray]:
    """Test indices of each fold: contiguous, the first n % n_folds folds one longer (sklearn KFold)."""
    if n_folds < 2 or n_folds > n:
        raise ValueError(f"{n_folds}-fold evaluation needs at least {max(n_folds, 2)} pairs and 2 folds, got {n} pairs")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[k], bounds[k + 1]) for k in range(n_folds)]


def _pca_distances(emb1: np.ndarray, emb2: np.ndarray, train: np.ndarray, n_components: int) -> np.ndarray:
    fit = np.concatenate([emb1[train], emb2[train]], axis=0).astype(np.float64)
    mean = fit.mean(axis=0)
    centred = fit - mean
    # Principal axes from the D x D scatter matrix: the same subspace as an SVD of the
    # data, at a fraction of the cost for thousands of rows.
    eigvals, eigvecs = np.linalg.eigh(centred.T @ centred)
    basis = eigvecs[:, np.argsort(eigvals)[::-1][:n_components]]
    p1 = _l2_normalize((emb1 - mean) @ basis)
    p2 = _l2_normalize((emb2 - mean) @ basis)
    return np.sum(np.square(p1 - p2), axis=1)


def _interpolate_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Threshold where the (non-decreasing, often flat) FAR curve reaches `target`.

    Linear between the last index whose FAR <= target and the next one, which is
    what scipy's interp1d(kind='slinear') did on these curves before it started to
    reject repeated x values. 0 when the curve never reaches the target.
    """
    if far.size == 0 or far.max() < target:
        return 0.0
    i = int(np.searchsorted(far, target, side="right")) - 1
    if i < 0:
        return float(thresholds[0])
    if i + 1 >= far.size:
        return float(thresholds[i])
    x0, x1 = far[i], far[i + 1]
    return float(thresholds[i] + (target - x0) * (thresholds[i + 1] - thresholds[i]) / (x1 - x0))


@dataclass(frozen=True)
class VerificationResult:
    """What `evaluate()` measures. Distances are squared L2 between normalised embeddings
    (0..4); a pair is "same" when its distance is below the threshold."""

    fold_accuracy: np.ndarray  # [nrof_folds]: each fold at the best threshold of the other folds
    fold_thresholds: np.ndarray  # [nrof_folds]: that best threshold, per fold
    tpr: np.ndarray  # [400]: true positive rate at thresholds 0, 0.01, ... 3.99, mean over folds
    fpr: np.ndarray  # [400]: false positive rate at the same thresholds, mean over folds
    val: float  # VAL (true accept rate) at FAR=1e-3, mean over folds
    val_std: float
    far: float  # the FAR actually reached at VAL's threshold, mean over folds

    @property
    def accuracy(self) -> float:
        """Mean accuracy over folds: the number insightface's tables report."""
        return float(np.mean(self.fold_accuracy))

    @property
    def accuracy_std(self) -> float:
        return float(np.std(self.fold_accuracy))

    @property
    def best_threshold(self) -> float:
        """Mean over folds of the threshold chosen on the other folds."""
        return float(np.mean(self.fold_thresholds))


def evaluate(
    embeddings: np.ndarray, actual_issame: Sequence[bool], nrof_folds: int = 10, pca: int = 0
) -> VerificationResult:
    """insightface's verification protocol.

    embeddings: [2N, D], rows 2i and 2i+1 form pair i (L2-normalised here). Each of
    `nrof_folds` contiguous folds is scored at the threshold that is best on the others;
    with `pca` > 0 the accuracy distances use that many principal components fitted on
    the other folds.
    """
    emb = np.asarray(embeddings)
    if not np.issubdtype(emb.dtype, np.floating):
        emb = emb.astype(np.float32)
    issame = np.asarray(actual_issame, dtype=bool)
    if emb.ndim != 2 or emb.shape[0] % 2 != 0:
        raise ValueError(f"embeddings must be [2N, D], got shape {emb.shape}")
    emb = _l2_normalize(emb)
    emb1, emb2 = emb[0::2], emb[1::2]
    n = len(issame)
    if emb1.shape[0] != n:
        raise ValueError(f"{emb.shape[0]} embeddings for {n} pairs; need exactly 2 per pair")
    folds = _contiguous_folds(n, nrof_folds)
    dist = np.sum(np.square(emb1 - emb2), axis=1)

    tprs = np.zeros((nrof_folds, ACCURACY_THRESHOLDS.size))
    fprs = np.zeros((nrof_folds, ACCURACY_THRESHOLDS.size))
    accuracy = np.zeros(nrof_folds)
    best_thresholds = np.zeros(nrof_folds)
    val = np.zeros(nrof_folds)
    far = np.zeros(nrof_folds)
    for k, test in enumerate(folds):
        train = np.ones(n, dtype=bool)
        train[test] = False
        fold_dist = _pca_distances(emb1, emb2, train, pca) if pca > 0 else dist

        # Accuracy: the first threshold with the best accuracy on the other folds.
        tp, fp = _count_accepted(fold_dist[train], issame[train], ACCURACY_THRESHOLDS)
        n_diff_train = int((~issame[train]).sum())
        acc_train = (tp + (n_diff_train - fp)) / int(train.sum())
        best = int(np.argmax(acc_train))
        best_thresholds[k] = ACCURACY_THRESHOLDS[best]

        t_same, t_diff = issame[test], ~issame[test]
        tp, fp = _count_accepted(fold_dist[test], t_same, ACCURACY_THRESHOLDS)
        n_same_test, n_diff_test = int(t_same.sum()), int(t_diff.sum())
        tprs[k] = _ratio(tp, n_same_test)
        fprs[k] = _ratio(fp, n_diff_test)
        accuracy[k] = (tp[best] + (n_diff_test - fp[best])) / test.size

        # VAL@FAR uses the plain distances, as the reference does even with PCA.
        _, fp = _count_accepted(dist[train], issame[train], VAL_THRESHOLDS)
        threshold = _interpolate_threshold(_ratio(fp, n_diff_train), VAL_THRESHOLDS, FAR_TARGET)
        accepted = dist[test] < threshold
        val[k] = _ratio(np.sum(accepted & t_same), n_same_test)
        far[k] = _ratio(np.sum(accepted & t_diff), n_diff_test)
    return VerificationResult(
        fold_accuracy=accuracy, fold_thresholds=best_thresholds, tpr=tprs.mean(axis=0), fpr=fprs.mean(axis=0),
        val=float(val.mean()), val_std=float(val.std()), far=float(far.mean()),
    )


# ---------------------------------------------------------------------------------------------
# Embedding


def _unwrap(model):
    # DDP's forward may broadcast buffers, a collective the ranks would not all reach equally often.
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def distinct_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse): the index of each distinct image's first occurrence, and for every
    image the position of its copy in `first`, so that `images[first][inverse]` equals `images`.

    A `.bin` stores both images of every pair, so a photo that is in several pairs (the public
    sets reuse theirs: CFP-FP's 7,000 pairs are drawn from its 7,000 photos) is stored several
    times; its embedding does not depend on the pair, so each distinct image is embedded once.
    Images are compared by a 128-bit BLAKE2 digest of their pixels: a collision between two
    different 112x112 images is not a practical concern. (torch.unique(dim=0) takes about as
    long, 0.4-0.5 s for 12,000 images on two cores, but returns a copy of every distinct
    image: the set's size again, 0.45 GB for LFW's 12,000, where the digests take 0.2 MB.)
    """
    rows = images.reshape(images.shape[0], -1)
    if not rows.is_contiguous() or rows.device.type != "cpu":
        rows = rows.contiguous().cpu()
    arrays = rows.numpy()
    slot_of_digest: dict[bytes, int] = {}
    first: list[int] = []
    inverse: list[int] = []
    for i in range(arrays.shape[0]):
        digest = hashlib.blake2b(arrays[i].data, digest_size=16).digest()
        slot = slot_of_digest.setdefault(digest, len(first))
        if slot == len(first):
            first.append(i)
        inverse.append(slot)
    return torch.tensor(first, dtype=torch.long), torch.tensor(inverse, dtype=torch.long)


def _embed_batches(
    images: torch.Tensor,
    flipped: torch.Tensor,
    indices: torch.Tensor,
    model,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    progress: Callable[[torch.Tensor], None] | None,
) -> torch.Tensor:
    """Raw embeddings [len(indices), 2, D] (image, flip), float32 on the CPU or the model's device.
    `progress(idx)` is called after each batch with the indices it embedded."""
    outputs = []
    if isinstance(model, torch.nn.Module):
        device = _module_device(model)
        # An eval-mode copy with BatchNorm folded into the convolutions: faster, and the
        # training model keeps its own modes (a frozen BatchNorm stays frozen) and weights.
        model = fold_batchnorm(model)
        autocast = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode():
            for start in range(0, indices.numel(), batch_size):
                idx = indices[start : start + batch_size]
                pair = []
                for source in (images, flipped):
                    x = normalize_batch(source[idx].to(device, non_blocking=True))
                    with autocast:
                        out = model(x).float()
                    # float16's range is small: a network whose BatchNorm statistics are not yet
                    # trained (evaluation before the first step) can overflow it. Such a batch
                    # is embedded again in float32 rather than scored as NaN.
                    if amp_dtype == torch.float16 and not bool(torch.isfinite(out).all()):
                        out = model(x).float()
                    pair.append(out)
                outputs.append(torch.stack(pair, dim=1))
                if progress is not None:
                    progress(idx)
    else:  # an Embedder (eval/embedder.py): normalises itself, returns numpy
        for start in range(0, indices.numel(), batch_size):
            idx = indices[start : start + batch_size]
            pair = [torch.from_numpy(np.asarray(model.embed(source[idx]), dtype=np.float32)) for source in (images, flipped)]
            outputs.append(torch.stack(pair, dim=1))
            if progress is not None:
                progress(idx)
    return torch.cat(outputs, dim=0)


def embed_verification_set(
    data_list: Sequence[torch.Tensor],
    backbone_or_embedder,
    batch_size: int,
    ctx=None,
    amp_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    distinct: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[np.ndarray, float]:
    """Embeddings of a verification set: image + flip summed and L2-normalised ([2N, D] float32),
    and XNorm, the mean norm of the raw image and flip embeddings.

    Each distinct image is embedded once (`distinct_images`, or `distinct`, its result for
    these images computed beforehand: sets repeat photos across pairs). With a distributed
    `ctx` every rank embeds an equal share of them (the last share padded by repeating the
    last image, so all ranks run the same number of forward passes) and all ranks receive
    the whole result; every rank must call this.
    `progress(n)` is called after each batch with the number of the set's images it
    covered (a repeated image counts once per place it holds), so the counts of a single
    process add up to the set's size.
    """
    images, flipped = data_list
    n = images.shape[0]
    if n == 0:
        raise ValueError("the verification set is empty")
    model = _unwrap(backbone_or_embedder)
    first, inverse = distinct if distinct is not None else distinct_images(images)
    num_distinct = first.numel()
    distributed = ctx is not None and ctx.is_distributed
    if distributed:
        share = math.ceil(num_distinct / ctx.world_size)
        positions = (torch.arange(share) + ctx.rank * share).clamp_(max=num_distinct - 1)
    else:
        positions = torch.arange(num_distinct)
    report = None
    if progress is not None:
        places_of_image = torch.zeros(n, dtype=torch.long)  # how many places each embedded image fills
        places_of_image[first] = torch.bincount(inverse, minlength=num_distinct)

        def report(idx: torch.Tensor) -> None:
            progress(int(places_of_image[idx].sum()))

    raw = _embed_batches(images, flipped, first[positions], model, batch_size, amp_dtype, report)

    if distributed:
        raw = raw.to(ctx.device).contiguous()
        gathered = [torch.empty_like(raw) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, raw)
        raw = torch.cat(gathered, dim=0)[:num_distinct]
    raw = raw[inverse.to(raw.device)]
    xnorm = float(raw.norm(dim=2).mean())
    embeddings = F.normalize(raw.sum(dim=1), dim=1)
    return embeddings.cpu().numpy().astype(np.float32, copy=False), xnorm
