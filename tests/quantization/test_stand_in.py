from __future__ import annotations

import copy

import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.quantization.native import native_attention
from st_bitembed.quantization.stand_in import StandIn

STAND_INS = {
    "qwen3_dir": {"FoldedRMSNorm", "NativeRMSNorm", "FusedGatedMLP", "NativeDecoderAttention"},
    "minilm_dir": {"NativeSelfAttention", "FusedIntermediate", "FusedResidualNorm"},
}


def stand_ins(model: BitEmbed) -> list[StandIn]:
    return [module for module in model.modules() if isinstance(module, StandIn)]


@pytest.mark.skipif(native_attention() is None, reason="the native kernels need AVX-512 and a C compiler")
@pytest.mark.parametrize("backbone", list(STAND_INS))
def test_stand_ins_show_their_modules_state_follow_train_mode_and_copy_without_caches(backbone, request):
    """Every stand-in of a decoder (folded and native norms, gated MLPs, attention) and of an encoder (attention,
    activations, residual norms): exactly its module's state dict; a copy made after encoding starts from empty caches
    (no C arrays pointing into the original's tensors) and encodes the same embeddings; training mode reaches them."""
    model = BitEmbed.from_backbone(str(request.getfixturevalue(backbone))).eval()
    assert {type(stand_in).__name__ for stand_in in stand_ins(model)} == STAND_INS[backbone]
    for stand_in in stand_ins(model):
        held = getattr(stand_in, stand_in.held_as)
        assert held not in stand_in.children()  # held, not a child: its parameters are not saved twice
        assert stand_in.state_dict().keys() == held.state_dict().keys()
    texts = ["The cat sits on the mat.", "Ternary weights: -1, 0 and +1, and eight-bit activations."]
    embeddings = model.encode(texts, convert_to_tensor=True)
    assert any(getattr(s, name) for s in stand_ins(model) for name in s.empty_caches())  # encoding filled caches
    twin = copy.deepcopy(model)
    for stand_in in stand_ins(twin):
        assert all(getattr(stand_in, name) == empty for name, empty in stand_in.empty_caches().items())
    assert twin[0].auto_model.state_dict().keys() == model[0].auto_model.state_dict().keys()
    torch.testing.assert_close(twin.encode(texts, convert_to_tensor=True), embeddings, rtol=0, atol=0)
    model.train()
    assert all(stand_in.training for stand_in in stand_ins(model))
