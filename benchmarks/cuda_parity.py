"""CUDA check of the int8 x ternary BitLinear path: torch._int_mm on the GPU against exact products and against the
float reference forward, on single layers and on a Qwen3-0.6B-shaped backbone (random weights).

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
from st_bitembed.quantization.kernels import activation_codes, gemm_backend, prepare_ternary_weight, ternary_linear
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


if __name__ == "__main__":
    main()
