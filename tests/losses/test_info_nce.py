from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_inputs import unit

from st_bitembed.losses import InfoNCELoss


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_equals_cross_entropy_over_scaled_similarities(converted_qwen3, symmetric):
    queries, positives, negatives = unit(4, 16, 0), unit(4, 16, 1), unit(4, 16, 2)
    loss = InfoNCELoss(converted_qwen3, temperature=0.1, symmetric=symmetric)
    logits = queries @ torch.cat([positives, negatives]).T / 0.1
    expected = F.cross_entropy(logits, torch.arange(4))
    if symmetric:
        expected = (expected + F.cross_entropy(positives @ queries.T / 0.1, torch.arange(4))) / 2
    value = loss.compute_loss_from_embeddings([queries, positives, negatives], None)
    torch.testing.assert_close(value, expected)
