"""Texts and embeddings the loss tests share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERIES = ["How do ternary weights work?", "What is the capital of France?", "Who wrote Hamlet?"]
DOCUMENTS = ["Weights are -1, 0 or +1 times a scale.", "Paris is the capital of France.", "Shakespeare wrote it."]
NEGATIVES = ["Bananas are yellow.", "The train was late again.", "Quantum computers use qubits."]


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def features(model, texts):
    return model.preprocess(texts)
