"""Evaluators: embedding extraction, head accuracy, k-NN and retrieval, adaptive deployment."""
