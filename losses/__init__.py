"""Margin-softmax losses: the combined angular margin and the sharded PartialFC head."""
from losses.margin import CombinedMarginLoss
from losses.partial_fc import PartialFC

__all__ = ["CombinedMarginLoss", "PartialFC"]
