from __future__ import annotations

import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.quantization import bitlinear, native, norm_folding
from st_bitembed.quantization.kernels import (
    gemm_backend,
    native_linear,
    prepare_native_projection,
    prepare_ternary_weight,
)
from st_bitembed.quantization.mlp_fusion import FusedGatedMLP, fuse_gated_mlps
from st_bitembed.quantization.native import TORCH_ACTIVATIONS, native_projections
from st_bitembed.quantization.ternary import ternary_weight_codes

ACTIVATION_OF = {"qwen3": "silu", "gemma3": "gelu_tanh"}


def agree_but_at_rounding_ties(output: torch.Tensor, expected: torch.Tensor) -> bool:
    """Every token's output within the float rounding of the activation (an ulp of a product moves its token's step,
    so every output of the token, by an ulp) and a code or two at rounding ties: cosine >= 0.99999."""
    output, expected = output.flatten(0, -2).float(), expected.flatten(0, -2).float()
    return bool(torch.nn.functional.cosine_similarity(output, expected, dim=1).min() >= 0.99999)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_mlp_gives_what_the_mlp_gives(backbone_dirs, family, dtype, tmp_path, monkeypatch):
    """Called on activations that no folded norm let through, down_proj's quantizer takes the gate, which it
    activates (Qwen3's SiLU, Gemma3's GELU-tanh), or the activated gate (PyTorch's activation), times the up
    projection row by row, rounded as PyTorch rounds them: with PyTorch's activation the module's outputs bit for
    bit; with the quantizer's, but where the activation's last float32 bits move a step or a code at a rounding tie.
    The checkpoint's keys stay."""
    model = BitEmbed.from_backbone(str(backbone_dirs[family]), model_kwargs={"dtype": dtype}).eval()
    backbone = model[0].auto_model
    mlp = backbone.layers[0].mlp
    assert isinstance(mlp, FusedGatedMLP) and type(mlp.mlp).__name__ == f"{family.capitalize()}MLP"
    native = gemm_backend("cpu") == "native"
    assert mlp.activation == (ACTIVATION_OF[family] if native else None)
    assert fuse_gated_mlps(backbone) == len(backbone.layers)  # again: counted, not wrapped twice
    hidden = (torch.randn(3, 70, mlp.gate_proj.in_features) * 2).to(dtype)  # more tokens than a query
    calls = []  # what down_proj hands the native kernel

    def recording(activations, projections, factor=None, activation=None):
        calls.append((factor, activation))
        return native_linear(activations, projections, factor, activation)

    monkeypatch.setattr(bitlinear, "native_linear", recording)
    with torch.no_grad():
        assert mlp.fuses()
        fused = mlp(hidden)
        assert calls == [] if not native else calls[-1][0] is not None and calls[-1][1] == mlp.activation
        product = mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden)
        expected = mlp.down_proj(product)
        unfused = mlp.mlp(hidden.clone())
        product_only = FusedGatedMLP(mlp.mlp)(hidden)  # PyTorch's activation, the product in the quantizer
    assert fused.dtype == dtype and torch.equal(expected, unfused)
    assert torch.equal(product_only, expected)
    assert agree_but_at_rounding_ties(fused, expected)
    seen = []  # a hook on the down projection sees its input: the module's own forward runs
    handle = mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        assert not mlp.fuses() and torch.equal(mlp(hidden), expected)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], product)
    model.save(str(tmp_path / "saved"))
    reloaded = BitEmbed(str(tmp_path / "saved"))
    assert isinstance(reloaded[0].auto_model.layers[0].mlp, FusedGatedMLP)
    assert set(reloaded[0].auto_model.state_dict()) == set(backbone.state_dict())


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_quantizers_activation_is_pytorchs(activation, dtype):
    """The quantizer's GELU-tanh and GELU (its own vectorized exp) against PyTorch's, through a projection, on gates
    from -90 to 90 (past exp's clamp) and on damaged tokens: a NaN or an infinity still makes the token NaN. 520
    inputs: 16-lane blocks and a tail."""
    if gemm_backend("cpu") != "native":
        pytest.skip("the native kernel is not built here")
    generator = torch.Generator().manual_seed(0)
    codes, scale = ternary_weight_codes(torch.randn(96, 520, generator=generator))
    weight = prepare_ternary_weight(codes, scale, "native")
    projections = native_projections([prepare_native_projection(weight)])
    gate = torch.randn(200, 520, generator=generator) * torch.logspace(-3, 1.3, 200)[:, None]
    gate[0] = torch.linspace(-90, 90, 520)
    gate[1, 7], gate[2, 9], gate[3, 11] = float("nan"), float("inf"), -float("inf")
    gate, up = gate.to(dtype), torch.randn(200, 520, generator=generator).to(dtype)
    with torch.no_grad():
        fused = native_linear(gate, projections, up, activation)[0]
        expected = native_linear(TORCH_ACTIVATIONS[activation](gate) * up, projections)[0]
    assert fused[1:4].isnan().all() and expected[1:4].isnan().all()
    assert agree_but_at_rounding_ties(fused[4:], expected[4:]) and agree_but_at_rounding_ties(fused[:1], expected[:1])
    with torch.no_grad():  # the check tells an activated gate from the gate itself
        assert not agree_but_at_rounding_ties(native_linear(gate, projections, up)[0][4:], expected[4:])


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amx_min_rows", [0, -1])
def test_the_gated_gemm_writes_the_activated_product(activation, dtype, amx_min_rows):
    """A gated call (gate with its output activation, then up) gives activation(gate) * up as PyTorch computes it
    from the two outputs, rounded at the same steps, within the activation's last float32 bits: for a query (1, 16
    and 20 rows: the AMX streaming loops), a batch (65 and 300 rows: unpacked panels, two row blocks), on the AMX
    tiles and without them (amx_min_rows -1), with a last panel of 4 outputs (100 = 2 x 48 + 4)."""
    if gemm_backend("cpu") != "native":
        pytest.skip("the native kernel is not built here")
    generator = torch.Generator().manual_seed(0)
    gate_weight, up_weight = (
        prepare_ternary_weight(*ternary_weight_codes(torch.randn(100, 192, generator=generator)), "native")
        for _ in range(2)
    )
    norm = torch.rand(192, generator=generator) + 0.5
    plain = native_projections([prepare_native_projection(w, None, norm) for w in (gate_weight, up_weight)])
    gate_projection = prepare_native_projection(gate_weight, None, norm, output_activation=activation)
    gated = native_projections([gate_projection, prepare_native_projection(up_weight, None, norm)])
    previous = native.set_amx_min_rows(amx_min_rows)
    try:
        for rows in (1, 16, 20, 65, 300):
            x = (torch.randn(rows, 192, generator=generator) * 2).to(dtype)
            with torch.no_grad():
                product = native_linear(x, gated, gated=True)
                gate, up = native_linear(x, plain)
            expected = TORCH_ACTIVATIONS[activation](gate) * up
            assert len(product) == 1 and product[0].dtype == dtype and product[0].shape == (rows, 100)
            tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-5  # a bf16 value an ulp apart at a rounding tie
            atol = 1e-6 * expected.abs().max().item()
            torch.testing.assert_close(product[0].float(), expected.float(), rtol=tolerance, atol=atol)
            assert not torch.allclose(product[0].float(), (gate * up).float(), rtol=tolerance, atol=atol)
    finally:
        native.set_amx_min_rows(previous)
    with pytest.raises(ValueError, match="gate and an up projection"):
        native_linear(x, native_projections([gate_projection]), gated=True)
    other = prepare_ternary_weight(*ternary_weight_codes(torch.randn(96, 192, generator=generator)), "native")
    with pytest.raises(ValueError, match="as many outputs"):
        native_linear(x, native_projections([gate_projection, prepare_native_projection(other)]), gated=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_behind_its_folded_norm_the_mlp_makes_its_product_in_the_gemm(backbone_dirs, family, dtype, monkeypatch):
    """In a decoder layer the MLP's input comes through the folded model norm: the gate and up projections' GEMM then
    writes activation(gate) * up (one gated call, no other projection call), which the down projection reads; the
    MLP gives what it gives with the norm run on its own. A hook on the gate projection sees its input: the module's
    own path runs then."""
    if gemm_backend("cpu") != "native":
        pytest.skip("the native kernel is not built here")
    model = BitEmbed.from_backbone(str(backbone_dirs[family]), model_kwargs={"dtype": dtype}).eval()
    layer = model[0].auto_model.layers[0]
    norm = layer.pre_feedforward_layernorm if family == "gemma3" else layer.post_attention_layernorm
    mlp = layer.mlp
    hidden = (torch.randn(2, 40, mlp.gate_proj.in_features) * 3).to(dtype)
    calls = []

    def recording(activations, projections, factor=None, activation=None, gated=False):
        calls.append(gated)
        return native_linear(activations, projections, factor, activation, gated)

    monkeypatch.setattr(norm_folding, "native_linear", recording)
    with torch.no_grad():
        through = norm(hidden)
        assert through is hidden and mlp.gated_norm(through) is norm
        fused = mlp(through)
        expected = mlp.mlp(norm.norm(hidden))
    assert calls == [True]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # the folded norm's rounding (test_norm_folding)
    torch.testing.assert_close(fused.float(), expected.float(), rtol=tolerance, atol=tolerance)
    seen = []
    handle = mlp.gate_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        through = norm(hidden)
        assert mlp.gated_norm(through) is None
        hooked = mlp(through)
    handle.remove()
    assert len(seen) == 1 and seen[0] is hidden and calls[1:] == [False]
    torch.testing.assert_close(hooked.float(), fused.float(), rtol=tolerance, atol=tolerance)


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
