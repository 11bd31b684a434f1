from __future__ import annotations

import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.quantization.native import native_residual_layer_norm
from st_bitembed.quantization.residual_norm import FusedResidualNorm, fuse_residual_norms

needs_native = pytest.mark.skipif(native_residual_layer_norm() is None, reason="the native kernels are not built here")


def within_rounding(output: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal but where the sums' order moves a value across a rounding boundary of the dtype: a bf16 step (2^-7
    relative), or a few float32 ulps; NaNs where the expected output has them."""
    rtol, atol = (2**-7, 1e-3) if output.dtype == torch.bfloat16 else (1e-5, 1e-5)
    return torch.allclose(output.float(), expected.float(), rtol=rtol, atol=atol, equal_nan=True)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_is_pytorchs_add_and_layer_norm(dtype):
    """LayerNorm(x + residual) as PyTorch computes it, the sum rounded first for bf16: within a rounding step (for
    bf16 the same value almost everywhere); rows of another stride read as such; a NaN or an infinity spoils its own
    row only."""
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(96, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=generator)
        norm.bias.normal_(0.0, 0.3, generator=generator)
    norm = norm.to(dtype)
    wide = (torch.randn(400, 150, generator=generator) * 4).to(dtype)
    hidden = wide[:, 10:106]  # rows of stride 150
    residual = (torch.randn(400, 96, generator=generator) * torch.logspace(-2, 3, 400)[:, None]).to(dtype)
    hidden[3, 7], residual[5, 9] = float("nan"), float("inf")
    weight, bias = norm.weight.float(), norm.bias.float()
    with torch.no_grad():
        output = native_residual_layer_norm()(hidden, residual, weight, bias, norm.eps)
        expected = norm(hidden + residual)
    assert output.dtype == dtype and output.shape == expected.shape
    assert output[3].isnan().all() and output[5].isnan().all()
    kept = torch.ones(400, dtype=torch.bool)
    kept[[3, 5]] = False
    assert within_rounding(output[kept], expected[kept])
    if dtype == torch.bfloat16:  # float32's last bits differ (PyTorch's moments and fused multiply-adds)
        assert (output[kept] != expected[kept]).float().mean() < 1e-3  # the order of the sums moves few bf16 values
    assert not within_rounding(output[kept], norm(hidden)[kept])  # the check tells the residual's absence


@needs_native
def test_the_kernel_refuses_what_it_cannot_read():
    kernel = native_residual_layer_norm()
    weight, bias = torch.ones(8), torch.zeros(8)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="shape and dtype"):
        kernel(x, x.bfloat16(), weight, bias, 1e-5)
    with pytest.raises(ValueError, match="rows of"):
        kernel(torch.randn(8, 4).t(), x, weight, bias, 1e-5)
    with pytest.raises(ValueError, match="features"):
        kernel(torch.randn(2, 9000), torch.randn(2, 9000), torch.ones(9000), torch.zeros(9000), 1e-5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernel(x.double(), x.double(), weight, bias, 1e-5)


def stand_ins(model: BitEmbed) -> list[FusedResidualNorm]:
    layers = model[0].auto_model.encoder.layer
    return [m for layer in layers for m in (layer.attention.output, layer.output)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stand_in_gives_what_the_module_gives(minilm_dir, dtype, tmp_path):
    """MiniLM's attention and MLP outputs: the modules' outputs within rounding; hooks on the norm see what it
    normalises (the module's own forward, exactly); embeddings as without the stand-ins; checkpoint keys unchanged
    and the stand-ins taken again at load."""
    model = BitEmbed.from_backbone(str(minilm_dir), model_kwargs={"dtype": dtype}).eval()
    backbone = model[0].auto_model
    outputs = stand_ins(model)
    assert all(isinstance(m, FusedResidualNorm) for m in outputs) and len(outputs) == 12
    assert fuse_residual_norms(backbone) == 12  # again: counted, not wrapped twice
    for output in outputs[:2]:  # attention's (384 -> 384) and the MLP's (1536 -> 384)
        hidden = (torch.randn(3, 70, output.dense.in_features) * 2).to(dtype)
        residual = (torch.randn(3, 70, output.dense.out_features) * 3).to(dtype)
        with torch.no_grad():
            assert output.applies(residual)
            fused, expected = output(hidden, residual), output.output(hidden, residual)
            assert fused.dtype == dtype and within_rounding(fused, expected)
            assert not within_rounding(output.output.LayerNorm(output.dense(hidden)), expected)
            seen = []  # a hook on the norm sees the sum: the module's own forward runs
            handle = output.LayerNorm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
            assert not output.applies(residual) and torch.equal(output(hidden, residual), expected)
            handle.remove()
            assert len(seen) == 1 and torch.equal(seen[0], output.dense(hidden) + residual)
    texts = ["The cat sits on the mat.", "Ternary weights: -1, 0 and +1. " * 20]
    with_stand_ins = model.encode(texts, convert_to_tensor=True)
    model.save(str(tmp_path / "saved"))
    for layer in backbone.encoder.layer:
        layer.attention.output, layer.output = layer.attention.output.output, layer.output.output
    without = model.encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(with_stand_ins.float(), without.float()).min() > 0.999
    reloaded = BitEmbed(str(tmp_path / "saved"))
    assert all(isinstance(m, FusedResidualNorm) for m in stand_ins(reloaded))
    assert set(reloaded[0].auto_model.state_dict()) == set(backbone.state_dict())


@needs_native
def test_training_runs_the_module_itself(minilm_dir):
    model = BitEmbed.from_backbone(str(minilm_dir)).train()
    output = stand_ins(model)[0]
    hidden = torch.randn(2, 5, output.dense.in_features, requires_grad=True)
    residual = torch.randn(2, 5, output.dense.out_features)
    assert not output.applies(residual)
    torch.manual_seed(0)
    result = output(hidden, residual)
    torch.manual_seed(0)  # the same dropout mask
    torch.testing.assert_close(result, output.output(hidden, residual))
    result.sum().backward()  # gradients reach the input, the projection and the norm
    assert hidden.grad is not None and output.dense.weight.grad is not None
    assert output.LayerNorm.weight.grad is not None


@needs_native
def test_only_a_layer_norm_with_weight_and_bias_is_taken(minilm_dir):
    model = BitEmbed.from_backbone(str(minilm_dir)).eval()
    backbone = model[0].auto_model
    for layer in backbone.encoder.layer:
        layer.attention.output = layer.attention.output.output
        layer.output = layer.output.output
    first = backbone.encoder.layer[0].attention.output
    first.LayerNorm = torch.nn.LayerNorm(first.dense.out_features, bias=False)
    backbone.encoder.layer[1].output.LayerNorm = torch.nn.RMSNorm(first.dense.out_features)
    assert fuse_residual_norms(backbone) == 10
    assert not isinstance(backbone.encoder.layer[0].attention.output, FusedResidualNorm)
    assert not isinstance(backbone.encoder.layer[1].output, FusedResidualNorm)
