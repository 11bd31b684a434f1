"""CUDA check of the int8 x ternary BitLinear path: torch._int_mm on the GPU against exact products and against the
float reference forward, on single layers and on a Qwen3-0.6B-shaped backbone (random weights); then the time of one
projection (Qwen3-0.6B's MLP shapes, one 16-token query and a 32 x 128 batch) in bf16 against the int8 path and
against cuBLASLt's int8 GEMM alone (CUDA events around 100 calls after a warm-up: launches included, as a model's
forward pays them).

Usage:
    python benchmarks/cuda_parity.py [--configs ../shared/models/configs] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from st_bitembed.quantization.bitlinear import install_bitlinear
from st_bitembed.quantization.convert import convert_to_bitlinear
from st_bitembed.quantization.kernels import (
    activation_codes,
    gemm_backend,
    int_mm_rows,
    prepare_ternary_weight,
    ternary_linear,
)
from st_bitembed.quantization.ternary import ternary_weight_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", default=str(Path(__file__).resolve().parents[2] / "shared" / "models" / "configs")
    )
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    device = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, integer GEMM on cuda: {gemm_backend(device)}")

    generator = torch.Generator().manual_seed(0)
    for rows, features, outputs in ((1, 1024, 3072), (17, 1024, 3072), (4096, 1024, 3072), (512, 3072, 1024)):
        x, w = torch.randn(rows, features, generator=generator), torch.randn(outputs, features, generator=generator)
        codes, step = activation_codes(x)
        weight_codes, scale = ternary_weight_codes(w)
        exact = (codes.double() @ weight_codes.double().T) * step.double() * scale.double()
        weight = prepare_ternary_weight(weight_codes.to(device), scale, gemm_backend(device))
        got = ternary_linear(x.to(device), weight)
        error = (got.double().cpu() - exact).abs().max().item() / exact.abs().max().item()
        print(f"ternary_linear {rows}x{features}x{outputs}: max relative error vs exact {error:.2e}")

    config_dict = json.loads((Path(args.configs) / "qwen3-0.6b.json").read_text())
    config_dict = {k: v for k, v in config_dict.items() if k not in ("architectures", "transformers_version")}
    config_dict.update(num_hidden_layers=args.layers, layer_types=config_dict["layer_types"][: args.layers])
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(**config_dict))
    convert_to_bitlinear(model, norm="all")
    model = model.to(device).eval()
    input_ids = torch.randint(10, 150_000, (8, 128), device=device)
    with torch.inference_mode():
        outputs = {}
        for kernel in ("reference", "int8"):
            install_bitlinear(model, kernel)
            outputs[kernel] = model(input_ids=input_ids).last_hidden_state.float()
    difference = (outputs["int8"] - outputs["reference"]).norm() / outputs["reference"].norm()
    cosine = torch.nn.functional.cosine_similarity(outputs["int8"][:, -1], outputs["reference"][:, -1], dim=-1)
    print(
        f"Qwen3-0.6B shape, {args.layers} layers: int8 vs reference hidden states, relative L2 {difference:.2e}, "
        f"last-token cosine min {cosine.min():.6f}"
    )
    report_projection_times()


def cuda_milliseconds(function, repeats: int = 100) -> float:
    """Mean milliseconds per call of ``repeats`` calls issued back to back (after a warm-up), between CUDA events."""
    function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


@torch.inference_mode()
def report_projection_times() -> None:
    print("\n| tokens | in -> out | bf16 linear | int8 path | its int8 GEMM alone | int8 path x bf16 |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for tokens in (16, 4096):
        for in_features, out_features in ((1024, 3072), (3072, 1024)):
            latent = torch.randn(out_features, in_features, generator=generator)
            activations = torch.randn(tokens, in_features, generator=generator).cuda().bfloat16()
            norm_weight = torch.rand(in_features, generator=generator).cuda() * 2
            codes, scale = ternary_weight_codes(latent)
            weight = prepare_ternary_weight(codes.cuda(), scale.cuda(), "int_mm")
            bf16_weight = latent.cuda().bfloat16()
            rows = int_mm_rows(tokens)  # as the int8 path pads them
            int8_codes = torch.randint(-127, 128, (rows, in_features), device="cuda", dtype=torch.int8)
            times = [
                cuda_milliseconds(lambda: torch.nn.functional.linear(activations, bf16_weight)),
                cuda_milliseconds(lambda: ternary_linear(activations, weight, None, norm_weight)),
                cuda_milliseconds(lambda: torch._int_mm(int8_codes, weight.operand.t())),
            ]
            cells = " | ".join(f"{t * 1e3:,.1f} us" for t in times)
            print(f"| {tokens} | {in_features} -> {out_features} | {cells} | {times[0] / times[1]:.2f} |")


if __name__ == "__main__":
    main()
