from __future__ import annotations

import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.quantization import bitlinear
from st_bitembed.quantization.kernels import gemm_backend, native_linear
from st_bitembed.quantization.mlp_fusion import FusedGatedMLP, fuse_gated_mlps


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_mlp_gives_exactly_what_the_mlp_gives(backbone_dirs, family, dtype, tmp_path, monkeypatch):
    """down_proj's quantizer takes the activated gate times the up projection row by row (rounded as PyTorch rounds
    the product): the same outputs as the module's own forward, bit for bit; the checkpoint's keys stay."""
    model = BitEmbed.from_backbone(str(backbone_dirs[family]), model_kwargs={"dtype": dtype}).eval()
    backbone = model[0].auto_model
    mlp = backbone.layers[0].mlp
    assert isinstance(mlp, FusedGatedMLP) and type(mlp.mlp).__name__ == f"{family.capitalize()}MLP"
    assert fuse_gated_mlps(backbone) == len(backbone.layers)  # again: counted, not wrapped twice
    hidden = (torch.randn(3, 70, mlp.gate_proj.in_features) * 2).to(dtype)  # more tokens than a query
    factors = []  # what down_proj hands the native kernel

    def recording(activations, projections, factor=None):
        factors.append(factor)
        return native_linear(activations, projections, factor)

    monkeypatch.setattr(bitlinear, "native_linear", recording)
    with torch.no_grad():
        assert mlp.fuses()
        fused = mlp(hidden)
        assert factors == [] if gemm_backend("cpu") != "native" else factors[-1] is not None
        product = mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden)
        expected = mlp.down_proj(product)
        unfused = mlp.mlp(hidden.clone())
    assert fused.dtype == dtype and torch.equal(fused, expected) and torch.equal(fused, unfused)
    seen = []  # a hook on the down projection sees its input: the module's own forward runs
    handle = mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        assert not mlp.fuses() and torch.equal(mlp(hidden), fused)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], product)
    model.save(str(tmp_path / "saved"))
    reloaded = BitEmbed(str(tmp_path / "saved"))
    assert isinstance(reloaded[0].auto_model.layers[0].mlp, FusedGatedMLP)
    assert set(reloaded[0].auto_model.state_dict()) == set(backbone.state_dict())


def test_training_runs_the_mlp_itself(converted_qwen3):
    mlp = converted_qwen3[0].auto_model.layers[0].mlp
    converted_qwen3.train()
    hidden = torch.randn(2, 5, mlp.gate_proj.in_features, requires_grad=True)
    assert not mlp.fuses()
    output = mlp(hidden)
    torch.testing.assert_close(output, mlp.mlp(hidden))
    output.sum().backward()  # gradients reach the input and every projection's latent weight
    assert hidden.grad is not None
    assert all(p.grad is not None for name, p in mlp.named_parameters() if name.endswith("proj.weight"))
