from __future__ import annotations

import pytest
import torch

from st_bitembed import BitEmbed
from st_bitembed.quantization.kernels import gemm_backend, ternary_linear
from st_bitembed.quantization.native import native_uint8_activation_codes
from st_bitembed.quantization.norm_folding import FoldedRMSNorm, fold_model_norms

NATIVE = gemm_backend("cpu") == "native"


def test_the_quantizer_with_a_folded_norm_gives_the_codes_of_the_two_norms_applied():
    """RMSNorm_g(RMSNorm_w(x)) has the codes and step of u * g / sqrt(mean(u^2) + eps (mean(x^2) + e)), u = x * w."""
    quantize = native_uint8_activation_codes()
    if quantize is None:
        pytest.skip("no C compiler here")
    torch.manual_seed(0)
    rows, cols, eps, outer_eps = 300, 384, 1e-6, 1e-5
    x = torch.randn(rows, cols, dtype=torch.float64) * torch.logspace(-3, 2, rows, dtype=torch.float64)[:, None]
    w, g = torch.rand(cols, dtype=torch.float64) * 2, torch.rand(cols, dtype=torch.float64) * 2
    x[7] = 0  # a zero token: both epsilons matter
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + outer_eps) * w  # the model's norm, in float64
    apart, folded = (torch.zeros(rows, cols, dtype=torch.uint8) for _ in range(2))
    expected_steps = quantize(normed.float(), g.float(), eps, apart)
    steps = quantize(x.float(), (w * g).float(), eps, folded, rms_weight=w.float(), outer_eps=outer_eps)
    difference = (apart.int() - folded.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3  # a rounding tie at most
    torch.testing.assert_close(steps, expected_steps, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_model_norms_compute_what_the_norms_did(backbone_dirs, family, dtype):
    model = BitEmbed.from_backbone(str(backbone_dirs[family]), model_kwargs={"dtype": dtype}).eval()
    backbone = model[0].auto_model
    layer = backbone.layers[0]
    assert fold_model_norms(backbone) == 2 * len(backbone.layers)  # already folded at conversion: counted, kept
    after_attention = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    assert isinstance(layer.input_layernorm, FoldedRMSNorm) and isinstance(
        getattr(layer, after_attention), FoldedRMSNorm
    )
    if family == "gemma3":  # normalises the attention's output, which the residual reads: never folded
        assert not isinstance(layer.post_attention_layernorm, FoldedRMSNorm)
    norm, q_proj = layer.input_layernorm, layer.self_attn.q_proj
    hidden = (torch.randn(2, 9, q_proj.in_features) * 3).to(dtype)
    with torch.no_grad():
        assert norm(hidden) is hidden or not NATIVE  # the norm is left to the projections (native backend)
        assert norm.folds(hidden) == NATIVE and norm.let_through(hidden) == NATIVE
        folded = q_proj(hidden)
        # Activations that did not come through the norm (here: the norm's own output) are taken as they are.
        expected = q_proj(norm.norm(hidden))
        assert not norm.let_through(hidden.clone())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(folded.float(), expected.float(), rtol=tolerance, atol=tolerance)
    model.train()  # training, and anything with gradients, runs the norm itself
    assert not norm.folds(hidden)
    torch.testing.assert_close(norm(hidden), norm.norm(hidden))


def test_folding_changes_no_checkpoint(qwen3_dir, tmp_path):
    model = BitEmbed.from_backbone(str(qwen3_dir))
    norm = model[0].auto_model.layers[0].input_layernorm
    assert isinstance(norm, FoldedRMSNorm) and norm.weight is norm.norm.weight  # the norm's own parameter
    state = model[0].auto_model.state_dict()
    assert "layers.0.input_layernorm.weight" in state and not any(".norm.weight" in key for key in state)
    texts = ["a short query", "a longer passage about ternary weights and 8-bit activations"]
    expected = model.encode(texts)
    model.save(str(tmp_path / "model"))
    reloaded = BitEmbed(str(tmp_path / "model"))
    assert isinstance(reloaded[0].auto_model.layers[0].input_layernorm, FoldedRMSNorm)
    torch.testing.assert_close(torch.as_tensor(reloaded.encode(texts)), torch.as_tensor(expected))


def test_without_the_native_backend_the_norm_runs(converted_qwen3):
    """The reference kernel (and any backend but the native one) reads normalised input: nothing is folded."""
    backbone = converted_qwen3[0].auto_model.eval()
    norm = backbone.layers[0].input_layernorm
    hidden = torch.randn(3, 5, norm.weight.shape[0])
    converted_qwen3.set_bitlinear_kernel("reference")
    with torch.no_grad():
        assert not norm.folds(hidden)
        torch.testing.assert_close(norm(hidden), norm.norm(hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_behind_a_folded_norm_run_together_and_each_gets_its_own_output(converted_qwen3, dtype):
    """The first of q, k and v to run computes all three in one call; each gets exactly what it computes alone (any
    order), and only for the very tensor the norm let through, unchanged since."""
    if not NATIVE:
        pytest.skip("the norm is folded on the native backend only")
    backbone = converted_qwen3[0].auto_model.to(dtype).eval()
    norm = backbone.layers[0].input_layernorm
    attention = backbone.layers[0].self_attn
    q_proj, k_proj, v_proj = attention.q_proj, attention.k_proj, attention.v_proj
    hidden = (torch.randn(2, 9, q_proj.in_features) * 3).to(dtype)

    def alone(projection: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        weight, bias, norm_weight, eps, _ = projection._operands()
        scale = norm.channel_scale()
        return ternary_linear(tensor, weight, bias, norm_weight * scale, eps, rms_weight=scale, outer_eps=norm.eps)

    with torch.no_grad():
        for order in ((q_proj, k_proj, v_proj), (v_proj, q_proj, k_proj)):
            let_through = norm(hidden)
            outputs = {projection: projection(let_through) for projection in order}
            for projection, output in outputs.items():
                assert output.dtype == dtype and torch.equal(output, alone(projection, hidden))
        let_through = norm(hidden)
        first = q_proj(let_through)
        assert torch.equal(q_proj(let_through), first)  # asked twice: computed again, the same
        let_through.mul_(2)  # changed in place after q ran: k and v compute on what it holds now
        assert torch.equal(k_proj(let_through), alone(k_proj, let_through))
        other = norm(hidden * 3)  # a new input: what the last one left waiting is not kept
        assert not norm._pending
        assert torch.equal(v_proj(other), alone(v_proj, hidden * 3))


def test_a_model_loaded_in_inference_mode_encodes(qwen3_dir, tmp_path):
    """Parameters made inside torch.inference_mode (there a module's ``.to()`` makes them) keep no version counter:
    the layers' caches still work."""
    BitEmbed.from_backbone(str(qwen3_dir)).save(str(tmp_path / "model"))
    texts = ["a short query", "a longer passage about ternary weights and 8-bit activations"]
    expected = BitEmbed(str(tmp_path / "model")).encode(texts, convert_to_tensor=True)
    with torch.inference_mode():
        model = BitEmbed(str(tmp_path / "model"))
        model[0].auto_model.to(torch.float64).to(torch.float32)  # the same values, in tensors made here
        assert model[0].auto_model.layers[0].self_attn.q_proj.weight.is_inference()
        torch.testing.assert_close(model.encode(texts, convert_to_tensor=True), expected)
