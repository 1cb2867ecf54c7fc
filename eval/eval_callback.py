"""In-training verification on the `.bin` sets next to the training data (lfw, cfp_fp, agedb_30).

Every rank calls the callback: the images are split over the ranks, embedded and
all-gathered, so evaluation costs 1/world_size of the single-GPU time and no rank
waits in a collective that another rank skips. Rank 0 logs; the caller passes the
returned results on to its tracker (TensorBoard, wandb).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from dataset.verification_bin import load_bin
from eval.verification import distinct_images, embed_verification_set, evaluate
from utils.distributed import DistContext

DEFAULT_LOGGER = "arcface.verification"


class VerificationCallback:
    def __init__(
        self,
        val_targets: Sequence[str],
        rec_prefix: str,
        ctx: DistContext | None,
        image_size: tuple[int, int] = (112, 112),
        batch_size: int = 64,
        logger: logging.Logger | None = None,
        amp_dtype: torch.dtype | None = None,
    ):
        self.ctx = ctx if ctx is not None else DistContext()
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.logger = logger if logger is not None else logging.getLogger(DEFAULT_LOGGER)
        self.sets: list[tuple[str, list[torch.Tensor], list[bool]]] = []
        # Which images of each set repeat, found once (about 0.5 s for LFW's 12,000 images)
        # rather than at every evaluation.
        self._distinct: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.highest_acc: dict[str, float] = {}
        for name in val_targets:
            path = os.path.join(rec_prefix, f"{name}.bin")
            if not os.path.isfile(path):
                if self.ctx.is_main:
                    self.logger.warning("verification set '%s' not found at %s: it will not be evaluated", name, path)
                continue
            data_list, issame = load_bin(path, image_size)
            self.sets.append((name, data_list, issame))
            self._distinct[name] = distinct_images(data_list[0])
            self.highest_acc[name] = 0.0

    def __call__(self, global_step: int, backbone: torch.nn.Module) -> dict[str, dict[str, float]]:
        """Evaluate every set; returns {name: {acc, std, xnorm, acc_best}} on every rank."""
        results = {}
        for name, data_list, issame in self.sets:
            acc, std, xnorm = self._evaluate_set(name, data_list, issame, backbone)
            self.highest_acc[name] = max(self.highest_acc[name], acc)
            results[name] = {"acc": acc, "std": std, "xnorm": xnorm, "acc_best": self.highest_acc[name]}
            if self.ctx.is_main:
                self.logger.info("[%s][%d]XNorm: %f", name, global_step, xnorm)
                self.logger.info("[%s][%d]Accuracy-Flip: %1.5f+-%1.5f", name, global_step, acc, std)
                self.logger.info("[%s][%d]Accuracy-Highest: %1.5f", name, global_step, self.highest_acc[name])
        return results

    def evaluate(self, backbone: torch.nn.Module) -> dict[str, dict[str, float]]:
        """{name: {acc, std, xnorm}} of another model on the same sets (e.g. a distillation
        teacher), without logging and without touching the best accuracies; every rank calls it."""
        results = {}
        for name, data_list, issame in self.sets:
            acc, std, xnorm = self._evaluate_set(name, data_list, issame, backbone)
            results[name] = {"acc": acc, "std": std, "xnorm": xnorm}
        return results

    def _evaluate_set(self, name, data_list, issame, backbone) -> tuple[float, float, float]:
        embeddings, xnorm = embed_verification_set(
            data_list, backbone, self.batch_size, ctx=self.ctx, amp_dtype=self.amp_dtype,
            distinct=self._distinct[name],
        )
        result = evaluate(embeddings, issame, nrof_folds=10)
        return result.accuracy, result.accuracy_std, xnorm
