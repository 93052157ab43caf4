"""Retrieval, the evaluation protocol every method shares (SPECS 1): Recall@K, MAP@R and
R-precision as pure functions of embeddings and labels (:mod:`.metrics`, pytorch-metric-learning's
definitions), embedding a split and scoring it, frozen features computed once, and zero-shot
transfer to other datasets beside the untrained backbone. It stands on data and models."""

from harness.retrieval.evaluation import FeatureCache, embed, evaluate, evaluate_queries, metric_name
from harness.retrieval.metrics import PerQuery, evaluate_retrieval, per_query_retrieval, recall_keys
from harness.retrieval.transfer import TransferSet, prepare_transfer, transfer_metrics
from harness.retrieval.transfer import parse as parse_transfer
from harness.tracking.per_query import column_of

__all__ = [
    "FeatureCache",
    "PerQuery",
    "TransferSet",
    "column_of",
    "embed",
    "evaluate",
    "evaluate_queries",
    "evaluate_retrieval",
    "metric_name",
    "parse_transfer",
    "per_query_retrieval",
    "prepare_transfer",
    "recall_keys",
    "transfer_metrics",
]
