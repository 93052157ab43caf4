"""Retrieval, the evaluation protocol every method shares (SPECS 1): Recall@K, MAP@R and
R-precision as pure functions of embeddings and labels (:mod:`.metrics`, pytorch-metric-learning's
definitions), embedding a split and scoring it, frozen features computed once, and zero-shot
transfer to other datasets beside the untrained backbone. It stands on data and models."""

from harness.retrieval.evaluation import FeatureCache, embed, evaluate, metric_name
from harness.retrieval.metrics import evaluate_retrieval, recall_keys
from harness.retrieval.transfer import TransferSet, prepare_transfer, transfer_metrics
from harness.retrieval.transfer import parse as parse_transfer

__all__ = [
    "FeatureCache",
    "TransferSet",
    "embed",
    "evaluate",
    "evaluate_retrieval",
    "metric_name",
    "parse_transfer",
    "prepare_transfer",
    "recall_keys",
    "transfer_metrics",
]
