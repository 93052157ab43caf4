"""Retrieval: kNN metrics, embedding and evaluating a split, zero-shot transfer."""
