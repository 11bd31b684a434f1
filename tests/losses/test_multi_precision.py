from __future__ import annotations

import pytest
import torch
from loss_inputs import unit

from st_bitembed.losses import InfoNCELoss, MultiPrecisionLoss


def test_multi_precision_serves_copies_and_leaves_the_embeddings_alone(converted_qwen3):
    loss = MultiPrecisionLoss(converted_qwen3, InfoNCELoss(converted_qwen3), precisions=["float32", "int2", "binary"])
    embeddings = [unit(4, 64, 0), unit(4, 64, 1)]
    originals = [e.clone() for e in embeddings]
    terms = loss.compute_terms(embeddings, None)
    assert all(torch.equal(e, o) for e, o in zip(embeddings, originals))
    assert len({round(t.item(), 6) for t in terms.values()}) == 3  # each precision really scores different vectors
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        MultiPrecisionLoss(converted_qwen3, InfoNCELoss(converted_qwen3), precisions=["int3"])
    with pytest.raises(ValueError, match="No precisions to train"):
        MultiPrecisionLoss(converted_qwen3, InfoNCELoss(converted_qwen3), precisions=[])
