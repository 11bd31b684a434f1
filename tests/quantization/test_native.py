from __future__ import annotations

import concurrent.futures
import os
import platform
import subprocess

import pytest
import torch

from st_bitembed.quantization import native
from st_bitembed.quantization.kernels import (
    UINT8_ZERO_POINT,
    activation_codes,
    integer_product,
    native_linear,
    prepare_native_projection,
    prepare_ternary_weight,
    ternary_linear,
    torch_activation_codes,
)
from st_bitembed.quantization.native import (
    MAX_PROJECTIONS,
    native_activation_codes,
    native_gemm_layout,
    native_projections,
    native_ternary_gemm,
    native_ternary_linear,
    native_uint8_activation_codes,
)


@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("offset", [0, UINT8_ZERO_POINT])
def test_compiled_quantizer_matches_the_torch_operators(with_norm, offset):
    compiled = native_activation_codes()
    if compiled is None:
        pytest.skip("no C compiler here: the PyTorch quantizer runs (tested above)")
    torch.manual_seed(0)
    norm_weight = torch.rand(384) * 2 if with_norm else None
    activations = torch.randn(300, 400)[:, :384] * torch.logspace(-4, 3, 300)[:, None]  # rows of stride 400
    activations[7] = 0
    codes, step = compiled(activations, norm_weight, 1e-6, offset)
    expected_codes, expected_step = torch_activation_codes(activations, norm_weight, 1e-6, offset)
    assert (codes - expected_codes).abs().max() <= 1  # the sum of squares in another order: a tie may round apart
    assert (codes != expected_codes).float().mean() < 1e-3
    torch.testing.assert_close(step, expected_step, rtol=1e-6, atol=0)
    assert codes.min() >= offset - 127 and codes.max() <= offset + 127 and (codes[7] == offset).all()
    # activation_codes takes the compiled path for float32 CPU input, and the PyTorch one otherwise
    torch.testing.assert_close(activation_codes(activations, norm_weight, 1e-6, offset), (codes, step))
    grad_input = activations.clone().requires_grad_()
    assert activation_codes(grad_input, norm_weight, 1e-6, offset)[0].equal(expected_codes)
    activations[3, 5], activations[4, 6] = float("nan"), float("inf")
    for quantizer in (compiled, torch_activation_codes):  # damage is carried to the output, not hidden in codes
        assert not quantizer(activations, norm_weight, 1e-6, offset)[1][3:5].isfinite().any()


@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # a bf16 model's activations are read as they are
def test_uint8_codes_are_the_float_codes_plus_the_zero_point(with_norm, dtype):
    compiled, uint8_codes = native_activation_codes(), native_uint8_activation_codes()
    if compiled is None:
        pytest.skip("no C compiler here")
    torch.manual_seed(1)
    norm_weight = torch.rand(97) * 2 if with_norm else None
    activations = (torch.randn(300, 97) * torch.logspace(-3, 2, 300)[:, None]).to(dtype)  # 300 rows: two threads
    activations[4, 9] = float("nan")
    buffer = torch.full((302, 100), 7, dtype=torch.uint8)  # rows and columns beyond the activations stay untouched
    steps = uint8_codes(activations, norm_weight, 1e-6, buffer)
    codes, expected_steps = compiled(activations.float(), norm_weight, 1e-6, 0)
    finite = torch.arange(300) != 4
    assert torch.equal(buffer[:300, :97][finite].float(), codes[finite] + UINT8_ZERO_POINT)
    torch.testing.assert_close(steps[finite], expected_steps[finite, 0], rtol=0, atol=0)
    assert steps[4].isnan() and (buffer[4, :97] == UINT8_ZERO_POINT).all()  # damage in the step; codes defined
    assert (buffer[300:] == 7).all() and (buffer[:, 97:] == 7).all()


def _clear(library_too: bool = True) -> None:
    functions = (
        native_activation_codes,
        native_uint8_activation_codes,
        native_gemm_layout,
        native_ternary_gemm,
        native_ternary_linear,
    )
    for function in (native._library, *functions) if library_too else functions:
        function.cache_clear()


def test_compiled_kernels_are_cached_and_optional(tmp_path, monkeypatch):
    monkeypatch.setenv("ST_BITEMBED_CACHE", str(tmp_path))
    _clear()
    try:
        if native_activation_codes() is None:
            pytest.skip("no C compiler here")
        assert native_uint8_activation_codes() is not None
        assert len(list((tmp_path / "kernels").glob("bitlinear-*.so"))) == 1
        monkeypatch.setenv("ST_BITEMBED_NATIVE", "0")
        _clear()
        assert native_activation_codes() is None and native_ternary_gemm() is None and native_ternary_linear() is None
        monkeypatch.setenv("ST_BITEMBED_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("ST_BITEMBED_CACHE", str(tmp_path / "other"))
        _clear()
        assert native_activation_codes() is None  # logged, not raised: the PyTorch path runs
        assert native_ternary_gemm() is None  # and the next GEMM backend
    finally:
        _clear()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="the kernels are written for x86-64 Linux"
)
def test_the_kernels_build_wherever_a_compiler_is_found():
    """The tests of the native kernels skip where they are not built, which must mean no compiler, never a kernel that
    no longer compiles: where ``cc`` exists the library builds (a build error here is in csrc/)."""
    if native._compiler() is None or os.environ.get("ST_BITEMBED_NATIVE", "1") == "0":
        pytest.skip("no C compiler here (or ST_BITEMBED_NATIVE=0): the PyTorch quantizer and GEMM libraries run")
    try:
        native._load(native._build(native._compiler()))  # every function it declares is there
    except subprocess.CalledProcessError as error:
        pytest.fail(f"csrc/ does not compile:\n{error.stderr.decode(errors='replace')[:3000]}")


@pytest.mark.parametrize("padding_code", [0, 255])
def test_the_native_gemm_ignores_what_the_padding_of_its_input_holds(padding_code):
    """Padding rows and inputs of the kernel's uint8 input may hold anything (2-bit weights store codes + 1, so a
    padding input's weight is 1 there: the row sum of the same bytes takes it back out exactly)."""
    if native_ternary_gemm() is None:
        pytest.skip("no native kernel here")
    torch.manual_seed(2)
    rows, in_features, out_features = 11, 601, 100  # 601 inputs: padded to a multiple of 4 or 16
    weight_codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)
    weight = prepare_ternary_weight(weight_codes, torch.tensor(0.5), "native")
    codes = torch.randint(-127, 128, (rows, in_features))
    buffer = torch.full(
        (16, weight.operand.shape[1] * native_gemm_layout().input_group), padding_code, dtype=torch.uint8
    )
    buffer[:rows, :in_features] = (codes + UINT8_ZERO_POINT).to(torch.uint8)
    steps, out = torch.rand(rows) + 0.5, torch.empty(rows, out_features)
    native_ternary_gemm()(buffer, rows, weight.operand, weight.column_sums, out_features, steps, 0.5, None, out)
    expected = (codes.double() @ weight_codes.double().T) * (steps.double()[:, None] * 0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


def test_the_avx2_kernel_is_exact_where_the_default_build_is_the_avx512_one(tmp_path, monkeypatch):
    """On an AVX512-VNNI processor the AVX2 kernel (16-bit sums) is built too, without AVX512, and checked: exact
    integer products (also at the largest 16-bit sums), bf16 outputs rounded as PyTorch rounds, and an activation
    applied as the output is written."""
    layout = native_gemm_layout()
    if layout is None or (layout.panel, layout.weight_bits) != (48, 2):
        pytest.skip("the default build here is not the AVX512-VNNI kernel: the AVX2 one is tested in test_kernels")
    monkeypatch.setenv("ST_BITEMBED_CACHE", str(tmp_path))
    avx2 = native._load(native._build(native._compiler(), ["-mno-avx512f"]))
    monkeypatch.setattr(native, "_library", lambda: avx2)
    _clear(library_too=False)
    try:
        assert native_gemm_layout() == (24, 4, 8)
        torch.manual_seed(0)
        for rows, in_features, out_features in ((1, 96, 40), (5, 601, 50), (300, 601, 50)):
            codes = torch.randint(-127, 128, (rows, in_features)).float()
            weight_codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)
            product = integer_product(codes, prepare_ternary_weight(weight_codes, torch.tensor(1.0), "native"))
            assert torch.equal(product.double(), codes.double() @ weight_codes.double().T)
        extremes = torch.full((9, 1030), 127.0)  # every 16-bit block sum at 64 * 510
        weight = prepare_ternary_weight(torch.ones(30, 1030, dtype=torch.int8), torch.tensor(1.0), "native")
        assert (integer_product(extremes, weight) == 127 * 1030).all()
        activations, norm_weight, bias = torch.randn(21, 96).bfloat16(), torch.rand(96) * 2, torch.randn(100)
        weight = prepare_ternary_weight(torch.randint(-1, 2, (100, 96), dtype=torch.int8), torch.tensor(0.3), "native")
        in_bfloat16 = ternary_linear(activations, weight, bias, norm_weight)  # four whole panels of 24, one partial
        expected = ternary_linear(activations.float(), weight, bias, norm_weight).bfloat16()
        assert in_bfloat16.dtype == torch.bfloat16 and torch.equal(in_bfloat16, expected)
        plain, activated = (  # the activation in the output's loop: AVX2 has no 16-lane one
            native_projections([prepare_native_projection(weight, bias, norm_weight, 1e-6, output_activation=name)])
            for name in (None, "gelu")
        )
        with torch.no_grad():
            linear, output = native_linear(activations, plain)[0], native_linear(activations, activated)[0]
        torch.testing.assert_close(output, torch.nn.functional.gelu(linear), rtol=2**-7, atol=4e-5)
        assert not torch.allclose(linear, output, rtol=2**-7, atol=4e-5)
    finally:
        monkeypatch.undo()
        _clear(library_too=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_call_projection_is_the_quantizer_then_the_gemm(dtype):
    """ternary_linear.c (what BitLinear runs) quantizes chunk by chunk into a per-thread buffer, then multiplies: the
    same outputs as the two kernels called apart, for any chunking, also from threads encoding at once."""
    if native_ternary_linear() is None:
        pytest.skip("no native kernel here")
    torch.manual_seed(3)
    in_features, out_features = 601, 100
    weight = prepare_ternary_weight(
        torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8), torch.tensor(0.3), "native"
    )
    norm_weight, bias = torch.rand(in_features) * 2, torch.randn(out_features)

    def apart(activations: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty(activations.shape[0] + 8, weight.operand.shape[1] * native_gemm_layout().input_group,
                             dtype=torch.uint8)  # fmt: skip
        steps = native_uint8_activation_codes()(activations, norm_weight, 1e-6, buffer)
        out = torch.empty(activations.shape[0], out_features, dtype=activations.dtype)
        native_ternary_gemm()(buffer, activations.shape[0], weight.operand, weight.column_sums, out_features, steps,
                              0.3, bias, out)  # fmt: skip
        return out

    projections = native_projections([prepare_native_projection(weight, bias, norm_weight, 1e-6)])

    def in_one_call(activations: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        out = torch.empty(activations.shape[0], out_features, dtype=activations.dtype)
        native_ternary_linear()(activations, projections, [out], chunk_rows)
        return out

    inputs = {rows: (torch.randn(rows, in_features) * 3).to(dtype) for rows in (1, 37, 300)}
    for rows, activations in inputs.items():
        expected = apart(activations)
        for chunk_rows in (1, 16, rows, 10_000):  # one token at a time, whole chunks and a partial one, all at once
            assert torch.equal(in_one_call(activations, chunk_rows), expected), (rows, chunk_rows)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each thread grows its own buffer
        results = list(pool.map(lambda rows: in_one_call(inputs[rows], 16), [300, 37, 1, 300, 37, 1] * 5))
    for rows, result in zip([300, 37, 1] * 10, results):
        assert torch.equal(result, apart(inputs[rows]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_of_one_input_in_one_call_give_what_each_gives_alone(dtype):
    """q, k and v (or gate and up) in one call: their GEMMs share one parallel loop; each output is exactly that
    projection's alone, whatever the sizes (partial panels), norms, biases and chunking."""
    if native_ternary_linear() is None:
        pytest.skip("no native kernel here")
    torch.manual_seed(4)
    in_features = 601
    projections = []
    for out_features, has_bias, has_norm in ((100, True, True), (48, False, True), (7, True, False)):
        weight = prepare_ternary_weight(
            torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8), torch.rand(()) + 0.1, "native"
        )
        bias = torch.randn(out_features) if has_bias else None
        norm_weight = torch.rand(in_features) * 2 if has_norm else None
        projections.append(prepare_native_projection(weight, bias, norm_weight, 1e-6))
    together = native_projections(projections)
    for rows in (1, 37, 300):
        activations = (torch.randn(rows, in_features) * 3).to(dtype)
        alone = [native_linear(activations, native_projections([projection]))[0] for projection in projections]
        for chunk_rows in (1, 16, rows):
            outs = [torch.empty(rows, projection.out_features, dtype=dtype) for projection in projections]
            native_ternary_linear()(activations, together, outs, chunk_rows)
            assert all(torch.equal(out, expected) for out, expected in zip(outs, alone)), (rows, chunk_rows)
        assert all(torch.equal(out, expected) for out, expected in zip(native_linear(activations, together), alone))


def test_one_call_takes_as_many_projections_as_the_kernel_s_limit_and_no_more():
    if native_ternary_linear() is None:
        pytest.skip("no native kernel here")
    torch.manual_seed(5)
    in_features, rows = 130, 21
    projections = [
        prepare_native_projection(
            prepare_ternary_weight(
                torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8), torch.rand(()) + 0.1, "native"
            ),
            torch.randn(out_features),
            torch.rand(in_features) * 2,
            1e-6,
        )
        for out_features in (1 + 37 * i % 97 for i in range(MAX_PROJECTIONS))  # partial panels
    ]
    activations = torch.randn(rows, in_features) * 3
    alone = [native_linear(activations, native_projections([projection]))[0] for projection in projections]
    together = native_linear(activations, native_projections(projections))
    assert all(torch.equal(out, expected) for out, expected in zip(together, alone, strict=True))
    for count in (0, MAX_PROJECTIONS + 1):
        with pytest.raises(ValueError, match=f"1 to {MAX_PROJECTIONS} projections of one input per call, got {count}"):
            native_projections((projections * 2)[:count])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_tiles_give_the_exact_products_of_the_vnni_kernel(dtype):
    """On a CPU with AMX the native GEMM runs on AMX tiles (ternary_gemm_amx.c: weights streamed for up to 64 rows,
    one tile of 16 rows through two panels or two tiles through one panel; unpacked per block beyond): exact, so one
    projection gives bit for bit the outputs of the AVX512-VNNI path, for any number of rows, odd numbers of panels (an
    item of one panel), inputs that are not whole tiles (those stay on AVX512-VNNI) and chunked inputs."""
    if not native.native_amx_available():
        pytest.skip("no AMX here (or Linux refused the tile state): the AVX512-VNNI / AVX2 kernels are tested above")
    torch.manual_seed(4)
    previous = native.set_amx_min_rows(0)
    try:
        for rows, in_features, out_features in ((1, 64, 48), (20, 256, 150), (33, 128, 100), (64, 192, 48),
                                                (300, 1024, 96), (513, 640, 1000), (40, 601, 50)):  # fmt: skip
            codes = torch.randint(-127, 128, (rows, in_features)).float()
            weight_codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)
            weight = prepare_ternary_weight(weight_codes, torch.tensor(1.0), "native")
            native.set_amx_min_rows(0)
            on_tiles = integer_product(codes, weight)
            native.set_amx_min_rows(-1)
            assert torch.equal(integer_product(codes, weight), on_tiles)
            assert torch.equal(on_tiles.double(), codes.double() @ weight_codes.double().T)
        extremes = torch.full((40, 1024), 127.0)
        weight = prepare_ternary_weight(-torch.ones(50, 1024, dtype=torch.int8), torch.tensor(1.0), "native")
        native.set_amx_min_rows(0)
        assert (integer_product(extremes, weight) == -127 * 1024).all()
        weight_codes = torch.randint(-1, 2, (200, 3072), dtype=torch.int8)
        weight = prepare_ternary_weight(weight_codes, torch.tensor(0.3), "native")
        activations, norm_weight, bias = (torch.randn(700, 3072) * 2).to(dtype), torch.rand(3072) * 2, torch.randn(200)
        outputs = []
        for min_rows in (0, -1):  # 700 x 3,072 inputs: chunks of 682 and 18 rows
            native.set_amx_min_rows(min_rows)
            outputs.append(ternary_linear(activations, weight, bias, norm_weight))
        assert outputs[0].dtype == dtype and torch.equal(outputs[0], outputs[1])
    finally:
        native.set_amx_min_rows(previous)
