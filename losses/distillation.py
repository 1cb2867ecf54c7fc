"""Knowledge distillation: a frozen teacher's embeddings as an auxiliary loss for the student.

The margin-softmax head keeps training the student on the labels (weight 1); this
module adds `distill_weight * loss(student, teacher)` computed on the same augmented
batch. It is one auxiliary loss term of the training step: `name = "distill"`,
`forward(images, embeddings, labels) -> weighted scalar`; its parameters (the
projection, if any) are optimised with the backbone's.

Losses (all on L2-normalised embeddings, computed in float32 whatever the autocast):
- `cosine`: 1 - cos(student_i, teacher_i), mean over the batch.
- `mse`: |s_i/|s_i| - t_i/|t_i||^2 summed over the embedding and averaged over the
  batch. On unit vectors this is exactly 2 * (1 - cos), so it is `cosine` at twice the
  weight; the per-sample sum (not a per-element mean) keeps it the squared Euclidean
  distance in [0, 4], independent of the embedding size, so one `distill_weight` means
  the same for a 128-d or a 512-d teacher.
- `relation`: the pairwise cosine-similarity matrix of the student's embeddings
  against that of the teacher's, over the GLOBAL batch (all ranks), mean squared
  difference over the N(N-1) off-diagonal pairs (the diagonal is 1 for both). It only
  compares similarities, so student and teacher sizes may differ without a projection.

With `cosine`/`mse` and different sizes a learned linear projection maps the student's
embedding to the teacher's size. A projection is always possible (any sizes), so
differing sizes never refuse a run. It has no bias: the losses see only directions,
and a bias could point every projected embedding along the teacher's mean direction,
lowering the loss without the student learning anything; both backbones end in a
BatchNorm1d, so their embeddings are already centred and a bias has nothing to correct.

The teacher is held outside the module's parameters, buffers and children: it is not
in `state_dict()` (checkpoints carry the projection and the teacher's identity, never
its weights; `model.pt` stays the student alone), `.train()` on a parent does not reach
it (it stays in eval mode: BatchNorm statistics fixed), the optimizer and DDP never see
it, and it runs under `torch.no_grad()`.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from backbones.weights import WeightsError, load_backbone_weights
# The gradient-correct gather of the PartialFC head: the local gradient comes back
# multiplied by the world size, so DDP's averaging yields the global-batch gradient.
from losses.partial_fc import _GatherEmbeddings, _distributed
from utils.config import ConfigError

__all__ = [
    "DISTILL_LOSSES",
    "Distillation",
    "Teacher",
    "build_distillation",
    "check_distillation",
    "cosine_loss",
    "mse_loss",
    "relation_loss",
]


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 embeddings (from autocast) in float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(student_i, teacher_i); both [B, D]."""
    cos = (F.normalize(student, dim=1) * F.normalize(teacher, dim=1)).sum(dim=1)
    return (1.0 - cos).mean()


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared distance of the normalised embeddings (summed over D)."""
    diff = F.normalize(student, dim=1) - F.normalize(teacher, dim=1)
    return diff.pow(2).sum(dim=1).mean()


def _all_gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Plain all-gather along dim 0 (no gradient: for the teacher's embeddings)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def relation_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Mean squared difference of the student's and the teacher's pairwise cosine
    similarities over the global batch, off-diagonal pairs only.

    `student` [b, Ds] and `teacher` [b, Dt] are this rank's samples (every rank the same b).
    Each rank computes the rows of its own samples against the whole gathered batch
    (b x N, not N x N), so the per-rank shares sum to the global loss; the student's
    embeddings are gathered with the head's gather, whose backward sums the shares'
    gradients and multiplies this rank's slice by the world size (DDP then averages).
    The value returned is the global loss on every rank (one scalar all_reduce, no host sync).
    """
    if _distributed(world_size):
        student_all = _GatherEmbeddings.apply(student, world_size, rank)
        teacher_all = _all_gather(teacher.detach(), world_size)
        first = rank * student.shape[0]
    else:
        student_all, teacher_all, first = student, teacher.detach(), 0
    b, n = student.shape[0], student_all.shape[0]
    if n < 2:  # no pairs: nothing to match, but keep the graph for a uniform backward
        return student.sum() * 0.0
    s = F.normalize(student_all, dim=1)
    t = F.normalize(teacher_all, dim=1)
    rows = slice(first, first + b)
    diff = s[rows] @ s.T - t[rows] @ t.T  # [b, N]
    diagonal = torch.zeros(b, n, dtype=torch.bool, device=diff.device)
    diagonal[torch.arange(b, device=diff.device), torch.arange(first, first + b, device=diff.device)] = True
    share = diff.pow(2).masked_fill(diagonal, 0.0).sum() / (n * (n - 1))
    if not _distributed(world_size):
        return share
    total = share.detach().clone()
    dist.all_reduce(total)
    # Value: the global loss; gradient: this rank's share (the gather's backward sums them).
    return share + (total - share.detach())


DISTILL_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cosine": cosine_loss,
    "mse": mse_loss,
    "relation": relation_loss,
}
# Losses that compare embeddings element by element need equal sizes (or a projection).
_NEEDS_EQUAL_SIZES = ("cosine", "mse")


def make_projection(student_size: int, teacher_size: int) -> nn.Linear:
    """Linear student_size -> teacher_size, no bias (see the module docstring), orthogonal init.

    Orthogonal columns (student_size <= teacher_size) embed the student's space
    isometrically, so at the start the loss measures the student, not a random map.
    """
    projection = nn.Linear(student_size, teacher_size, bias=False)
    nn.init.orthogonal_(projection.weight)
    return projection


def _output_size(network: nn.Module) -> int:
    """The embedding size: every backbone family ends in a BatchNorm1d over it."""
    last = None
    for module in network.modules():
        if isinstance(module, nn.BatchNorm1d):
            last = module
    if last is None:
        raise ValueError(f"{type(network).__name__} has no final BatchNorm1d to read the embedding size from")
    return last.num_features


class Distillation(nn.Module):
    """The distillation loss term: frozen teacher, optional projection, loss kind and weight."""

    name = "distill"

    def __init__(
        self,
        teacher: nn.Module,
        loss: str,
        weight: float,
        student_size: int,
        teacher_size: int | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
        identity: dict[str, Any] | None = None,
    ):
        super().__init__()
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"unknown distillation loss {loss!r}; valid: {', '.join(DISTILL_LOSSES)}")
        teacher_size = teacher_size or _output_size(teacher)
        teacher.eval()
        teacher.requires_grad_(False)
        # In __dict__, not as a submodule: out of state_dict, parameters() and .train().
        self.__dict__["_teacher"] = teacher
        self.loss = loss
        self.weight = float(weight)
        self.student_size, self.teacher_size = student_size, teacher_size
        self.autocast_dtype = autocast_dtype
        self.rank, self.world_size = rank, world_size
        self.identity = dict(identity or {})
        needs_projection = loss in _NEEDS_EQUAL_SIZES and student_size != teacher_size
        self.projection = make_projection(student_size, teacher_size) if needs_projection else None
        self.last_value: torch.Tensor | None = None  # unweighted, detached, on the device

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (e.g. to evaluate it on the verification sets)."""
        return self._teacher

    def _apply(self, fn, recurse=True):
        # .to(device) / .to(memory_format=...) / .double() move the teacher with the module.
        super()._apply(fn, recurse)
        self._teacher._apply(fn, recurse)
        return self

    @torch.no_grad()
    def teacher_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings of `images`, under the run's autocast when one is set
        (else under whatever autocast the caller has active)."""
        precision = (
            torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None else contextlib.nullcontext()
        )
        with precision:
            return self._teacher(images)

    def unweighted(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The distillation loss of student embeddings [b, Ds] against teacher embeddings [b, Dt]."""
        with torch.autocast(device_type=student.device.type, enabled=False):
            student, teacher = _full_precision(student), _full_precision(teacher)
            if self.projection is not None:
                weight = self.projection.weight
                dtype = torch.promote_types(student.dtype, weight.dtype)
                student = F.linear(student.to(dtype), weight.to(dtype))
            if self.loss == "relation":
                return relation_loss(student, teacher, rank=self.rank, world_size=self.world_size)
            return DISTILL_LOSSES[self.loss](student, teacher.to(student.dtype))

    def forward(
        self, images: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`distill_weight * loss(student, teacher)`; `embeddings` are the student's
        un-normalised local embeddings of `images` (labels are not used)."""
        loss = self.unweighted(embeddings, self.teacher_embeddings(images))
        self.last_value = loss.detach()
        return loss * self.weight

    # ---- what checkpoints hold: the projection and the teacher's identity, never its weights
    def get_extra_state(self) -> dict[str, Any]:
        return {"loss": self.loss, "teacher_size": self.teacher_size, **self.identity}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved, ours = state.get("teacher_sha256"), self.identity.get("teacher_sha256")
        if saved and ours and saved != ours:
            raise ConfigError(
                f"teacher={self.identity.get('teacher')!r} is not the teacher this run was trained with "
                f"(its checkpoint: teacher={state.get('teacher')!r}, teacher_network={state.get('teacher_network')!r}, "
                f"weights sha256 {saved[:12]}, this file {ours[:12]}); pass the run's teacher to resume it"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError:
            saved = state_dict.get("projection.weight")
            theirs = "no projection" if saved is None else f"a projection {saved.shape[1]} -> {saved.shape[0]}"
            ours = (
                "no projection" if self.projection is None
                else f"a projection {self.student_size} -> {self.teacher_size}"
            )
            raise ConfigError(
                f"the checkpoint's distillation state has {theirs}, this run (distill_loss={self.loss!r}, "
                f"embedding_size={self.student_size}, teacher size {self.teacher_size}) needs {ours}"
            ) from None

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss!r}, weight={self.weight}, teacher={type(self._teacher).__name__}"
            f"({self.teacher_size}), student_size={self.student_size}"
        )


# ---- building from the config ---------------------------------------------------------------

@dataclass(frozen=True)
class Teacher:
    """A loaded teacher (on the CPU) and what identifies it in checkpoints."""

    module: nn.Module
    path: str
    network: str
    embedding_size: int
    sha256: str

    def identity(self) -> dict[str, Any]:
        return {
            "teacher": self.path, "teacher_network": self.network,
            "teacher_embedding_size": self.embedding_size, "teacher_sha256": self.sha256,
        }


def weights_sha256(network: nn.Module) -> str:
    """A digest of a network's state_dict (names, shapes, dtypes and bytes): the same teacher
    whichever file format or path it was loaded from."""
    digest = hashlib.sha256()
    for key, value in network.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())  # the buffer, no copy
    return digest.hexdigest()


def _check_keys(cfg, where: str) -> None:
    """The value checks that need no file."""
    loss = cfg.distill_loss
    if loss not in DISTILL_LOSSES:
        hint = difflib.get_close_matches(str(loss), list(DISTILL_LOSSES), n=1, cutoff=0.5)
        raise ConfigError(
            f"{where}: distill_loss must be one of {', '.join(map(repr, DISTILL_LOSSES))}, got {loss!r}"
            f"{f'; did you mean {hint[0]!r}?' if hint else ''}"
        )
    weight = cfg.distill_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{where}: distill_weight must be a finite number >= 0 (0 turns distillation off), got {weight!r}")
    size = cfg.teacher_embedding_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ConfigError(f"{where}: teacher_embedding_size must be a positive int or None (read from the weights), got {size!r}")


def _default_warn(message: str) -> None:
    from utils.log import LOGGER_NAME

    logging.getLogger(LOGGER_NAME).warning(message)


def check_distillation(cfg, *, warn: Callable[[str], None] | None = None, where: str = "config") -> Teacher | None:
    """Validate the distillation keys and load the teacher on the CPU; None when distillation is off.

    Raises ConfigError (a key's value) or WeightsError (the teacher file) with one line
    naming the key and the value. Reads the teacher file, writes nothing: call it before
    the run creates its output.
    """
    _check_keys(cfg, where)
    if cfg.distill_weight == 0:
        if cfg.teacher:
            (warn or _default_warn)(
                f"teacher={cfg.teacher!r} is set but distill_weight is 0: distillation is off and the teacher "
                f"is not loaded (set distill_weight > 0, e.g. --distill_weight=1, to distil)"
            )
        return None
    if not cfg.teacher:
        raise ConfigError(
            f"{where}: distill_weight={cfg.distill_weight} needs a teacher: set teacher to the teacher's "
            f"model.pt / backbone.pth (and teacher_network to its architecture)"
        )
    from backbones.registry import available_models

    network = cfg.teacher_network
    if not network:
        raise ConfigError(f"{where}: teacher={cfg.teacher!r} needs teacher_network, the teacher's architecture (e.g. 'r100')")
    if network not in available_models():
        hint = difflib.get_close_matches(str(network), available_models(), n=1, cutoff=0.5)
        raise ConfigError(
            f"{where}: teacher_network={network!r} is not a known network"
            f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; valid: {', '.join(available_models())}"
        )
    path = os.fspath(cfg.teacher)
    if not os.path.isfile(path):
        raise WeightsError(f"teacher={path!r}: file not found")
    try:
        module = load_backbone_weights(path, network, embedding_size=cfg.teacher_embedding_size)
    except WeightsError as exc:
        detail = str(exc).removeprefix(f"{path}: ")
        size = f", teacher_embedding_size={cfg.teacher_embedding_size}" if cfg.teacher_embedding_size else ""
        raise WeightsError(f"teacher={path!r} (teacher_network={network!r}{size}): {detail}") from None
    return Teacher(module, path, network, _output_size(module), weights_sha256(module))


def build_distillation(
    cfg,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
    embedding_size: int | None = None,
    *,
    teacher: Teacher | None = None,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    warn: Callable[[str], None] | None = None,
) -> Distillation | None:
    """The distillation term of this run on `device`, or None when `distill_weight == 0`.

    `teacher` is what `check_distillation(cfg)` returned (checked earlier, before the
    output was written); without it the teacher is checked and loaded here.
    `embedding_size` is the student's (default cfg.embedding_size); `memory_format` the
    step's (the teacher's convolutions take the student's channels-last batch);
    `autocast_dtype` the run's autocast precision, in which the teacher runs.
    """
    if teacher is None:
        teacher = check_distillation(cfg, warn=warn)
    if teacher is None:
        return None
    term = Distillation(
        teacher.module, cfg.distill_loss, cfg.distill_weight,
        embedding_size or cfg.embedding_size, teacher.embedding_size,
        autocast_dtype=autocast_dtype, rank=rank, world_size=world_size, identity=teacher.identity(),
    )
    return term.to(device=device, memory_format=memory_format)
