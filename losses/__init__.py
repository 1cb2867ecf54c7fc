"""Margin-softmax losses: the margins (combined/ArcFace/CosFace, AdaFace, MagFace,
CurricularFace, ElasticFace), sub-centres, and the sharded PartialFC head.

    from losses import get_margin, PartialFC
    margin = get_margin("adaface", s=64.0, m=0.4, h=0.333, t_alpha=0.01)
    head = PartialFC(margin, embedding_size, num_classes, sample_rate=1.0, num_subcenters=1)
    loss = head(local_embeddings, local_labels)

The training script builds the margin from its config with `build_margin(cfg)`.
"""
from losses.adaface import AdaFaceMargin
from losses.curricularface import CurricularFaceMargin
from losses.elasticface import ElasticFaceMargin
from losses.magface import MagFaceMargin
from losses.margin import CombinedMarginLoss, GlobalBatch, Margin
from losses.partial_fc import PartialFC
from losses.registry import available_losses, build_margin, get_margin, loss_parameters

__all__ = [
    "AdaFaceMargin",
    "CombinedMarginLoss",
    "CurricularFaceMargin",
    "ElasticFaceMargin",
    "GlobalBatch",
    "MagFaceMargin",
    "Margin",
    "PartialFC",
    "available_losses",
    "build_margin",
    "get_margin",
    "loss_parameters",
]
