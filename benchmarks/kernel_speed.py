"""The BitLinear inference pieces alone: the activation quantizer (compiled vs PyTorch operators) and the integer GEMM
backends (the native ternary kernel, also without its AMX tiles where it has them, FBGEMM, oneDNN; each from float
codes, as ``integer_product`` takes them) against
the fp32 and bf16 products (a teacher's GEMMs), for MiniLM-, Gemma3-270M- and Qwen3-0.6B-sized projections; a short
query through many projections, and q, k and v in one native call against one call each; a Gemma3 MLP's down
projection with its GELU-tanh in the quantizer against PyTorch's GELU then the quantizer's product, and a MiniLM MLP's
intermediate projection with its GELU in the kernel's output against PyTorch's GELU after it; a MiniLM block's
residual add and LayerNorm in one native pass against PyTorch's two; a gated MLP with its product written by the gate
and up projections' GEMM against the product taken by the down projection's quantizer; an encoder's self-attention
(MiniLM's heads) in one native call against PyTorch's ``scaled_dot_product_attention``, and a decoder's (Qwen3-0.6B's
grouped heads, causal), with the masked keys skipped or not.

Usage:
    python benchmarks/kernel_speed.py [--threads 2] [--query-only | --activation-only | --norm-only | --mlp-only |
        --attention-only | --decoder-attention-only]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from st_bitembed.quantization.kernels import (
    UINT8_ZERO_POINT,
    gemm_backend,
    integer_product,
    native_linear,
    prepare_native_projection,
    prepare_ternary_weight,
    ternary_linear,
    torch_activation_codes,
)
from st_bitembed.quantization.native import (
    TORCH_ACTIVATIONS,
    native_activation_codes,
    native_amx_available,
    native_attention,
    native_attention_tiles,
    native_projections,
    native_residual_layer_norm,
    set_amx_min_rows,
    set_attention_bfloat16_pairs,
)

# (in_features, out_features) of real projections: MiniLM attention / MLP, Gemma3-270M MLP, Qwen3-0.6B MLP.
SHAPES = ((384, 384), (384, 1536), (640, 2048), (1024, 3072), (3072, 1024))
TOKENS = (16, 256, 2048)
# A short query through many layers: more weights than the last-level cache, so each GEMM reads its weights from
# memory, as a model's forward does; 16 tokens, and the longer queries of 32 and 64 (two and four tiles of AMX rows).
QUERY_TOKENS, QUERY_LENGTHS, QUERY_LAYERS, QUERY_SHAPE = 16, (16, 32, 64), 60, (1024, 3072)


def milliseconds(function, budget: float = 0.5) -> float:
    """Median time of ``function`` over repeats that fill about ``budget`` seconds, after one warm-up call."""
    function()
    start = time.perf_counter()
    function()
    repeats = max(3, int(budget / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--query-only", action="store_true", help="only the short query through many projections")
    parser.add_argument("--activation-only", action="store_true", help="only the activations in the kernels")
    parser.add_argument("--norm-only", action="store_true", help="only the residual add and LayerNorm in one pass")
    parser.add_argument("--mlp-only", action="store_true", help="only the gated MLPs, product in the GEMM or not")
    parser.add_argument("--attention-only", action="store_true", help="only the encoder self-attention, native or not")
    parser.add_argument("--decoder-attention-only", action="store_true", help="only a decoder's causal attention")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.query_only:
        query_through_layers()
        return
    if args.activation_only:
        activation_in_quantizer()
        activation_in_output()
        return
    if args.norm_only:
        residual_norm_in_one_pass()
        return
    if args.mlp_only:
        gated_mlps()
        return
    if args.attention_only:
        self_attention()
        return
    if args.decoder_attention_only:
        decoder_self_attention()
        return
    compiled = native_activation_codes()
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, ms (median)")
    print("\n| tokens x in | PyTorch quantizer | compiled quantizer | speed-up |\n|---|---|---|---|")
    for tokens in TOKENS:
        for in_features in sorted({k for k, _ in SHAPES}):
            activations, norm_weight = torch.randn(tokens, in_features), torch.rand(in_features)
            eager = milliseconds(lambda: torch_activation_codes(activations, norm_weight))
            if compiled is None:
                print(f"| {tokens} x {in_features} | {eager:.3f} | (no compiler) | - |")
                continue
            fused = milliseconds(lambda: compiled(activations, norm_weight, 1e-6, 0))
            print(f"| {tokens} x {in_features} | {eager:.3f} | {fused:.3f} | {eager / fused:.1f}x |")
    amx = native_amx_available()  # then a column of the native kernel without its AMX tiles (AVX512-VNNI only)
    vnni_column = " native, AVX512-VNNI only |" if amx else ""
    print(f"\n| tokens x in x out | fp32 matmul | bf16 matmul | native |{vnni_column} FBGEMM | oneDNN |")
    print("|---" * (6 + amx) + "|")
    for tokens in TOKENS:
        for in_features, out_features in SHAPES:
            codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)
            dense = codes.float()
            activations = torch.randint(-127, 128, (tokens, in_features)).float()
            dense_bf16, activations_bf16 = dense.bfloat16(), activations.bfloat16()
            cells = [
                milliseconds(lambda: activations @ dense.T),
                milliseconds(lambda: activations_bf16 @ dense_bf16.T),
            ]
            for backend, offset in (("native", 0), ("fbgemm", 0), ("onednn", UINT8_ZERO_POINT)):
                try:
                    weight = prepare_ternary_weight(codes, torch.tensor(1.0), backend)
                except (RuntimeError, AttributeError, NotImplementedError):
                    cells.append(float("nan"))
                    continue
                shifted = activations + offset
                cells.append(milliseconds(lambda: integer_product(shifted, weight)))
                if backend == "native" and amx:
                    default = set_amx_min_rows(-1)
                    cells.append(milliseconds(lambda: integer_product(shifted, weight)))
                    set_amx_min_rows(default)
            row = " | ".join(f"{cell:.3f}" for cell in cells)
            print(f"| {tokens} x {in_features} x {out_features} | {row} |")
    query_through_layers()
    activation_in_quantizer()
    activation_in_output()
    residual_norm_in_one_pass()


def query_through_layers() -> None:
    """16, 32 and 64 tokens through 60 Qwen3-0.6B-sized projections (180 M weights): a BitLinear projection (quantizer
    and GEMM, on the default backend) vs the bf16 matmul."""
    in_features, out_features = QUERY_SHAPE
    backend = gemm_backend("cpu")
    layers = [torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8) for _ in range(QUERY_LAYERS)]
    ternary = [prepare_ternary_weight(codes, torch.tensor(1.0), backend) for codes in layers]
    bf16 = [codes.bfloat16() for codes in layers]
    del layers
    norm_weight = torch.rand(in_features)

    def through_bitlinears(activations: torch.Tensor) -> None:
        for weight in ternary:
            ternary_linear(activations, weight, None, norm_weight)

    def through_matmuls(activations: torch.Tensor) -> None:
        for weight in bf16:
            activations @ weight.T

    print(f"\nTokens through {QUERY_LAYERS} projections {in_features} -> {out_features} (bf16 activations), ms:")
    for tokens in QUERY_LENGTHS:
        activations = torch.randn(tokens, in_features).bfloat16()
        bitlinear = milliseconds(functools.partial(through_bitlinears, activations))
        matmul = milliseconds(functools.partial(through_matmuls, activations))
        print(f"{tokens} tokens: BitLinear ({backend}) {bitlinear:.1f}, bf16 matmul {matmul:.1f}, "
              f"{matmul / bitlinear:.2f}x")  # fmt: skip
    if backend == "native":
        query_projections_together()


def query_projections_together() -> None:
    """q, k and v of 28 Qwen3-0.6B-sized layers (1,024 -> 2,048, 1,024, 1,024; a folded model norm in front) on 16
    tokens: the three in one native call, as BitLinear runs them, vs one call each; taking turns, medians of 10."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(28):
        projections = []
        for out_features in (2048, 1024, 1024):
            codes = torch.randint(-1, 2, (out_features, 1024), dtype=torch.int8, generator=generator)
            weight = prepare_ternary_weight(codes, torch.tensor(0.1), "native")
            scale = torch.rand(1024, generator=generator) + 0.5
            projections.append(prepare_native_projection(weight, None, scale * scale, 1e-6, scale, 1e-6))
        layers.append((native_projections(projections), [native_projections([p]) for p in projections]))
    activations = torch.randn(1, QUERY_TOKENS, 1024, generator=generator).bfloat16()
    together, apart = [], []
    for _ in range(10):
        together.append(milliseconds(lambda: [native_linear(activations, group) for group, _ in layers]))
        apart.append(milliseconds(lambda: [native_linear(activations, one) for _, ones in layers for one in ones]))
    together, apart = statistics.median(together), statistics.median(apart)
    print(f"q, k and v of 28 layers on {QUERY_TOKENS} tokens: in one call per layer {together:.2f} ms, one call per "
          f"projection {apart:.2f} ms")  # fmt: skip


def activation_in_quantizer() -> None:
    """A Gemma3-270M MLP's down projection (2,048 -> 640) on 32 x 128 bf16 tokens, from its gate and up projection:
    PyTorch's GELU-tanh, then the quantizer's product (what runs for other activations), vs the GELU-tanh computed by
    the quantizer; taking turns, medians of 10."""
    if gemm_backend("cpu") != "native":
        return
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (640, 2048), dtype=torch.int8, generator=generator)
    weight = prepare_ternary_weight(codes, torch.tensor(0.1), "native")
    projection = native_projections([prepare_native_projection(weight, None, torch.rand(2048) + 0.5, 1e-6)])
    gate, up = (torch.randn(4096, 2048, generator=generator).bfloat16() for _ in range(2))
    gelu = TORCH_ACTIVATIONS["gelu_tanh"]
    in_pytorch, in_quantizer = [], []
    for _ in range(10):
        in_pytorch.append(milliseconds(lambda: native_linear(gelu(gate), projection, up), budget=0.2))
        in_quantizer.append(milliseconds(lambda: native_linear(gate, projection, up, "gelu_tanh"), budget=0.2))
    in_pytorch, in_quantizer = statistics.median(in_pytorch), statistics.median(in_quantizer)
    print(f"Gemma3 MLP down projection, 4,096 bf16 tokens: PyTorch's GELU-tanh then the product in the quantizer "
          f"{in_pytorch:.2f} ms, GELU-tanh and product in the quantizer {in_quantizer:.2f} ms")  # fmt: skip


def activation_in_output() -> None:
    """A MiniLM MLP's intermediate projection (384 -> 1,536, bias, GELU) on 32 x 256 bf16 tokens: the projection then
    PyTorch's GELU vs the GELU applied by the kernel as it writes the output; taking turns, medians of 10."""
    if gemm_backend("cpu") != "native":
        return
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (1536, 384), dtype=torch.int8, generator=generator)
    weight = prepare_ternary_weight(codes, torch.tensor(0.1), "native")
    bias, norm_weight = torch.randn(1536, generator=generator), torch.rand(384, generator=generator) + 0.5
    plain = native_projections([prepare_native_projection(weight, bias, norm_weight, 1e-6)])
    with_gelu = prepare_native_projection(weight, bias, norm_weight, 1e-6, output_activation="gelu")
    activated = native_projections([with_gelu])
    hidden = torch.randn(8192, 384, generator=generator).bfloat16()
    gelu = TORCH_ACTIVATIONS["gelu"]
    in_pytorch, in_kernel = [], []
    for _ in range(10):
        in_pytorch.append(milliseconds(lambda: gelu(native_linear(hidden, plain)[0]), budget=0.2))
        in_kernel.append(milliseconds(lambda: native_linear(hidden, activated), budget=0.2))
    in_pytorch, in_kernel = statistics.median(in_pytorch), statistics.median(in_kernel)
    print(f"MiniLM MLP intermediate projection, 8,192 bf16 tokens: then PyTorch's GELU {in_pytorch:.2f} ms, "
          f"GELU in the kernel's output {in_kernel:.2f} ms")  # fmt: skip


def residual_norm_in_one_pass() -> None:
    """A MiniLM block's end, LayerNorm(output + residual), on 32 x 300 bf16 tokens of 384: PyTorch's add then its
    LayerNorm vs the native pass; taking turns, medians of 10."""
    kernel = native_residual_layer_norm()
    if kernel is None:
        return
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(384, eps=1e-12).bfloat16()
    weight, bias = norm.weight.float(), norm.bias.float()
    output, residual = (torch.randn(32, 300, 384, generator=generator).bfloat16() for _ in range(2))
    in_pytorch, native = [], []
    with torch.no_grad():
        for _ in range(10):
            in_pytorch.append(milliseconds(lambda: norm(output + residual), budget=0.2))
            native.append(milliseconds(lambda: kernel(output, residual, weight, bias, norm.eps), budget=0.2))
    in_pytorch, native = statistics.median(in_pytorch), statistics.median(native)
    print(f"MiniLM residual add and LayerNorm, 9,600 bf16 tokens: PyTorch's add then LayerNorm {in_pytorch:.2f} ms, "
          f"one native pass {native:.2f} ms")  # fmt: skip


def gated_mlps() -> None:
    """Qwen3-0.6B's MLP (1,024 -> 2 x 3,072 -> 1,024, SiLU) and Gemma3-270M's (640 -> 2 x 2,048 -> 640, GELU-tanh) on
    bf16 tokens (a 16- and a 64-token query, 32 x 128 tokens): the gate and up projections in one call, then the
    product taken by the down projection's quantizer (Qwen3's SiLU in PyTorch first, Gemma3's GELU-tanh in the
    quantizer), vs the product written by the gated GEMM; taking turns, medians of 10."""
    if gemm_backend("cpu") != "native":
        return
    generator = torch.Generator().manual_seed(0)

    def projection(in_features: int, out_features: int, activation: str | None = None):
        codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8, generator=generator)
        weight = prepare_ternary_weight(codes, torch.tensor(0.1), "native")
        norm_weight = torch.rand(in_features, generator=generator) + 0.5
        return prepare_native_projection(weight, None, norm_weight, 1e-6, output_activation=activation)

    print("\n| MLP, tokens | product in the down projection's quantizer | written by the gated GEMM | speed-up |")
    print("|---|---|---|---|")
    for name, hidden, intermediate, activation in (("Qwen3", 1024, 3072, "silu"), ("Gemma3", 640, 2048, "gelu_tanh")):
        gate, up = projection(hidden, intermediate), projection(hidden, intermediate)
        pair, down = native_projections([gate, up]), native_projections([projection(intermediate, hidden)])
        activated_gate = native_projections([projection(hidden, intermediate, activation), up])
        activate = TORCH_ACTIVATIONS[activation]

        def in_quantizer(x: torch.Tensor) -> torch.Tensor:
            gate_output, up_output = native_linear(x, pair)
            if activation == "silu":  # as the stand-in ran Qwen3: PyTorch's SiLU, the product in the quantizer
                return native_linear(activate(gate_output), down, up_output)[0]
            return native_linear(gate_output, down, up_output, activation)[0]

        def in_gemm(x: torch.Tensor) -> torch.Tensor:
            return native_linear(native_linear(x, activated_gate, gated=True)[0], down)[0]

        for tokens in (16, 64, 4096):
            x = torch.randn(tokens, hidden, generator=generator).bfloat16()
            apart, gated = [], []
            for _ in range(10):
                apart.append(milliseconds(lambda: in_quantizer(x), budget=0.2))
                gated.append(milliseconds(lambda: in_gemm(x), budget=0.2))
            apart, gated = statistics.median(apart), statistics.median(gated)
            print(f"| {name}, {tokens:,} | {apart:.3f} | {gated:.3f} | {apart / gated:.2f}x |")


def self_attention() -> None:
    """MiniLM's self-attention (12 heads of 32) on batches of 32 sequences of 16 to 384 tokens, bf16 and float32,
    every other sequence padded to half its length (a boolean mask, as transformers gives): PyTorch's
    ``scaled_dot_product_attention`` then the heads side by side, as the module runs it, vs the native kernel (bf16 on
    AMX tiles where the CPU has them, else as bf16 pairs where it has AVX512-BF16, and, in a column of its own there,
    widened to float32); taking turns, medians of 10."""
    kernel = native_attention()
    if kernel is None:
        return
    pairs = set_attention_bfloat16_pairs(True) >= 0 and not native_attention_tiles(32)
    widened_column = " native, bf16 widened |" if pairs else ""
    print(f"\n| dtype, batch x tokens | PyTorch's attention | native |{widened_column} speed-up |")
    print("|---" * (4 + pairs) + "|")
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for tokens in (16, 32, 48, 64, 128, 256, 384):
            batch, heads, head_dim = 32, 12, 32
            projected = torch.randn(3, batch, tokens, heads, head_dim, generator=generator).to(dtype)
            query, key, value = (x.transpose(1, 2) for x in projected)  # strided views, as the module's are
            attended = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool)
            attended[1::2, ..., tokens // 2 :] = False

            def in_pytorch() -> torch.Tensor:
                out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attended)
                return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

            def in_kernel(bfloat16_pairs: bool = True) -> torch.Tensor:
                set_attention_bfloat16_pairs(bfloat16_pairs)
                return kernel(query, key, value, attended, head_dim**-0.5)

            sdpa, native, widened = [], [], []
            for _ in range(10):
                sdpa.append(milliseconds(in_pytorch, budget=0.2))
                native.append(milliseconds(in_kernel, budget=0.2))
                if pairs and dtype == torch.bfloat16:
                    widened.append(milliseconds(lambda: in_kernel(bfloat16_pairs=False), budget=0.2))
            set_attention_bfloat16_pairs(True)
            sdpa, native = statistics.median(sdpa), statistics.median(native)
            name = str(dtype).removeprefix("torch.")
            cells = [f"{sdpa:.3f}", f"{native:.3f}"]
            if pairs:
                cells.append(f"{statistics.median(widened):.3f}" if widened else "-")
            print(f"| {name}, {batch} x {tokens} | {' | '.join(cells)} | {sdpa / native:.2f}x |")


def decoder_self_attention() -> None:
    """Qwen3-0.6B's self-attention (16 query heads of 128 sharing 8 key heads), causal, bf16 and float32, on 32 x 128,
    16 x 256 and 8 x 512 tokens: PyTorch's ``scaled_dot_product_attention`` with ``is_causal`` and ``enable_gqa`` (what
    transformers runs for a batch without padding) then the heads side by side, vs the native kernel given the causal
    mask, without and with the hint that it is causal (the masked keys skipped); taking turns, medians of 10."""
    from st_bitembed.quantization.native_decoder_attention import causal_mask

    kernel = native_attention()
    if kernel is None:
        return
    print("\n| dtype, batch x tokens | PyTorch's attention | native | native, masked keys skipped | speed-up |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    heads, key_heads, head_dim = 16, 8, 128
    for dtype in (torch.bfloat16, torch.float32):
        for batch, tokens in ((32, 128), (16, 256), (8, 512)):
            query = torch.randn(batch, tokens, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
            key, value = (
                torch.randn(batch, tokens, key_heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
                for _ in range(2)
            )
            mask = causal_mask(tokens)

            def in_pytorch() -> torch.Tensor:
                out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                                       enable_gqa=True)  # fmt: skip
                return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

            timings: dict[str, list[float]] = {"sdpa": [], "native": [], "skipped": []}
            for _ in range(10):
                timings["sdpa"].append(milliseconds(in_pytorch, budget=0.2))
                timings["native"].append(milliseconds(lambda: kernel(query, key, value, mask, head_dim**-0.5), 0.2))
                timings["skipped"].append(
                    milliseconds(lambda: kernel(query, key, value, mask, head_dim**-0.5, True), budget=0.2)
                )
            sdpa, native, skipped = (statistics.median(timings[name]) for name in ("sdpa", "native", "skipped"))
            cells = f"{sdpa:.3f} | {native:.3f} | {skipped:.3f} | {sdpa / skipped:.2f}x"
            print(f"| {str(dtype).removeprefix('torch.')}, {batch} x {tokens} | {cells} |")


if __name__ == "__main__":
    main()
