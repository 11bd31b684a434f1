from __future__ import annotations

import torch

from st_bitembed.evaluation import posthoc_quantize


def test_posthoc_baseline_calibrates_on_the_embeddings_and_binary_is_sign():
    embeddings = torch.nn.functional.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    int2 = posthoc_quantize(embeddings, "int2")
    assert all(len(torch.unique(column)) <= 4 for column in int2.T)
    assert torch.equal(posthoc_quantize(embeddings, "binary"), torch.sign(embeddings))
    assert (posthoc_quantize(embeddings, "int8") - embeddings).abs().max() < (int2 - embeddings).abs().max()
