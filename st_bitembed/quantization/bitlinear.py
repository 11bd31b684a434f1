"""BitLinear: transformers' ``AutoBitLinear`` (training form, straight-through estimator) with an integer inference
path that quantizes the weights once, folds the RMSNorm into the activation codes and can drop the latent weights."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from transformers.integrations.bitnet import AutoBitLinear

from st_bitembed.allocator import return_freed_memory
from st_bitembed.quantization.kernels import (
    TernaryWeight,
    gemm_backend,
    native_linear,
    prepare_native_projection,
    prepare_ternary_weight,
    ternary_linear,
)
from st_bitembed.quantization.native import TORCH_ACTIVATIONS, NativeProjection, native_projections
from st_bitembed.quantization.packing import pack_codes, unpack_codes
from st_bitembed.quantization.ternary import ternary_weight_codes

if TYPE_CHECKING:
    from st_bitembed.quantization.norm_folding import FoldedRMSNorm

Kernel = Literal["int8", "reference"]


class InferenceOperands(NamedTuple):
    """What a BitLinear's inference path computes with, prepared once per parameter version."""

    weight: TernaryWeight
    bias: torch.Tensor | None  # float32
    norm_weight: torch.Tensor | None  # float32; None without an inserted norm
    eps: float  # the inserted norm's epsilon
    native: ctypes.Array | None  # the native kernel's description of them, where that kernel runs


KERNELS: tuple[str, ...] = ("int8", "reference")


class BitLinear(AutoBitLinear):
    """``AutoBitLinear`` whose inference (eval mode, no gradients) runs int8 x ternary integer GEMMs.

    Training, and anything that needs gradients, runs transformers' own forward (fake quantization of the latent
    weights with a straight-through estimator). At inference the ternary codes are computed once and laid out for
    the device's integer GEMM (:func:`~st_bitembed.quantization.kernels.gemm_backend`), recomputed whenever the
    latent weights change; the RMSNorm in front is folded into the per-token int8 activation codes.

    :meth:`release_latent_weight` frees the float latent weight and keeps only the codes (what ``BitEmbed(path)``
    does for a model loaded to encode). The layer then materialises a latent weight from its codes when it is
    needed: ``train()``, a forward with gradients, ``state_dict()`` (without keeping it) or ``load_state_dict()``.
    The materialised weight ``codes * scale / mean(|codes|)`` has the same ternary codes and, up to a float rounding
    of its mean, the same scale; until it changes the layer computes with the codes and scale it was rebuilt from, so
    the integer path computes exactly what it did (transformers' float forward takes the scale from the weight's
    mean: an ulp or two apart). What the model loses is how far each latent weight was from a rounding threshold.

    Saved checkpoints do not record this class: transformers rebuilds ``AutoBitLinear`` from the BitNet
    quantization config, and :class:`~st_bitembed.BitEmbed` swaps in this class after loading.

    Attributes:
        kernel: ``"int8"`` (default: the integer path at inference) or ``"reference"`` (transformers' float
            forward always).
    """

    kernel: Kernel = "int8"
    # Release the latent weight at the first inference forward (BitEmbed(path)); cleared for good by train().
    release_at_inference: bool = False
    # The model norm in front, folded into this layer's quantizer at inference (norm_folding.py); None: none.
    folded_norm: FoldedRMSNorm | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ternary: TernaryWeight | None = None
        self._ternary_key: tuple | None = None
        # While the latent weight is released: its codes, 2 bits each (the GEMM's layout of them cannot be read back),
        # and their scale.
        self._released_codes: torch.Tensor | None = None
        self._released_scale: torch.Tensor | None = None
        # A latent weight rebuilt from released codes: (its version key, those codes, their scale), the codes and
        # scale the layer computes with until the weight changes (its absmean is the scale only up to a rounding).
        self._rebuilt_from: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        # What the inference path reads: the prepared weight, and the bias and norm weight as the GEMMs' rescale
        # reads them (float32; the bias of an offline layer times its scale), and on the native backend the kernel's
        # description of them all, made once per version of the parameters (and device and backend) instead of at
        # every call, checked with one key: (key, operands).
        self._inference_operands: tuple[tuple, InferenceOperands] | None = None
        # The native kernel's description of this layer behind a folded model norm: (norm weight, scale, projection).
        self._folded_projection: tuple[torch.Tensor, torch.Tensor, str | None, NativeProjection] | None = None
        # The native kernel's description of this layer with an activation on its outputs: (operands, activation,
        # projections).
        self._activated_projection: tuple[InferenceOperands, str, ctypes.Array] | None = None
        self.register_state_dict_post_hook(_materialize_in_state_dict)
        self.register_load_state_dict_pre_hook(_materialize_before_loading)

    @classmethod
    def from_autobitlinear(cls, layer: AutoBitLinear) -> BitLinear:
        """The same layer (same parameters and norm objects, nothing copied) with the inference path."""
        with torch.device("meta"):
            new = cls(
                layer.in_features, layer.out_features, bias=layer.bias is not None, online_quant=layer.online_quant
            )
        new.weight, new.bias, new.rms_norm = layer.weight, layer.bias, layer.rms_norm
        if not layer.online_quant:
            new.weight_scale = layer.weight_scale
        return new.train(layer.training)

    @property
    def latent_weight_released(self) -> bool:
        """Whether the float latent weight is freed and only the ternary codes are kept."""
        return self._released_codes is not None

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scale)``: the ``[N, K]`` int8 ternary codes and 0-d float32 scale this layer computes with."""
        if self._released_codes is not None:
            return unpack_codes(self._released_codes, 2, self.in_features), self._released_scale
        if self._rebuilt_from is not None and self._rebuilt_from[0] == version_key(self.weight):
            return unpack_codes(self._rebuilt_from[1], 2, self.in_features), self._rebuilt_from[2]
        if self.online_quant:
            return ternary_weight_codes(self.weight)
        # Offline (exported) checkpoints hold the ternary values, with their scale beside them.
        return self.weight.detach().round().to(torch.int8), self.weight_scale.detach().float().reshape(())

    def _weight_key(self, backend: str) -> tuple:
        # What the prepared weight depends on: the latent weight's storage and version, its device, the backend.
        return *version_key(self.weight), self.weight.device, backend

    def _prepare(self, codes: torch.Tensor, scale: torch.Tensor, backend: str) -> TernaryWeight:
        self._ternary = prepare_ternary_weight(codes.to(self.weight.device), scale, backend)
        self._ternary_key = self._weight_key(backend)
        return self._ternary

    def _inference_weight(self) -> TernaryWeight:
        backend = gemm_backend(self.weight.device.type)
        if self._ternary_key != self._weight_key(backend):  # first use, new latent weights, or another device
            return self._prepare(*self.ternary_codes(), backend)
        return self._ternary

    def release_latent_weight(self) -> None:
        """Keep only the int8 ternary codes (and the GEMM's layout of them): the float latent weight is freed.

        The weight parameter stays (same object, shape and dtype, so optimizers and module code still see it) but
        points at a single float: it takes no memory until it is materialised again."""
        if self._released_codes is not None:
            return
        codes, scale = self.ternary_codes()  # computed once, for the GEMM's layout and the 2-bit copy
        self._released_codes, self._released_scale = pack_codes(codes, 2), scale.detach().float().reshape(())
        self._rebuilt_from = None
        placeholder = torch.zeros(1, dtype=self.weight.dtype, device=self.weight.device)
        self.weight.data = placeholder.expand(self.weight.shape)
        self._prepare(codes, scale, gemm_backend(self.weight.device.type))

    @torch.inference_mode(False)  # also when the reference kernel first runs in encode: the weight may train later
    def materialize_latent_weight(self) -> None:
        """Give the layer a float latent weight again, rebuilt from its codes (see the class docstring)."""
        if self._released_codes is None:
            return
        self.weight.data = self._weight_from_codes()
        self._rebuilt_from = (version_key(self.weight), self._released_codes, self._released_scale)
        self._released_codes = self._released_scale = None

    def _weight_from_codes(self) -> torch.Tensor:
        codes, scale = self.ternary_codes()
        if not self.online_quant:  # offline layers store the ternary values themselves
            return codes.to(self.weight.dtype)
        # absmean(codes * s) = s * mean|codes|: dividing by mean|codes| gives back exactly scale s and these codes.
        nonzero_share = codes.abs().float().mean().clamp(min=1 / codes.numel())
        return (codes.float() * (scale / nonzero_share)).to(self.weight.dtype)

    def __getstate__(self) -> dict[str, Any]:
        # The GEMM's layout is a cache, rebuilt at first use: pickling it (e.g. to the processes of
        # sentence-transformers' multi-process encoding) would send temporaries of FBGEMM's packed weights.
        state = super().__getstate__()
        return {
            **state,
            "_ternary": None,
            "_ternary_key": None,
            "_rebuilt_from": None,
            "_inference_operands": None,
            "_folded_projection": None,
            "_activated_projection": None,
        }

    def train(self, mode: bool = True) -> BitLinear:
        if mode:  # a layer that trains keeps its latent weight from now on, also through evaluations
            self.release_at_inference = False
            self.materialize_latent_weight()
        return super().train(mode)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.kernel == "reference" or self.training or torch.is_grad_enabled():
            self.materialize_latent_weight()
            return super().forward(input)
        folded = self.folded_norm
        if folded is not None and folded.let_through(input):  # the raw residual stream: its norm is folded in
            return folded.project(self, input)  # with the other projections of the same input, in one call
        operands = self._operands()
        if operands.native is not None:
            return native_linear(input, operands.native)[0]
        return ternary_linear(input, operands.weight, operands.bias, operands.norm_weight, operands.eps)

    def forward_of_product(
        self, activations: torch.Tensor, factor: torch.Tensor, activation: str | None = None
    ) -> torch.Tensor:
        """``self(activations * factor)``, or ``self(activation(activations) * factor)`` with ``activation`` (a
        :data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` name). On the native backend at inference the
        activation and the product are taken as the quantizer reads each row and never materialised (a gated MLP's
        down projection: :mod:`~st_bitembed.quantization.mlp_fusion`): the same outputs, except where the
        activation's float32 rounding (an ulp or two from PyTorch's) moves a code at a rounding tie."""
        operands = self._native_operands()
        if operands is None:
            activated = activations if activation is None else TORCH_ACTIVATIONS[activation](activations)
            return self(activated * factor)
        return native_linear(activations, operands.native, factor, activation)[0]

    def forward_activated(self, input: torch.Tensor, activation: str) -> torch.Tensor:
        """``activation(self(input))`` for a :data:`~st_bitembed.quantization.native.TORCH_ACTIVATIONS` name. On the
        native backend at inference the kernel applies the activation as it writes the output (an encoder MLP's
        first projection: :mod:`~st_bitembed.quantization.activation_fusion`), which saves PyTorch's pass over the
        output: the same outputs, except where the activation's float32 rounding (an ulp or two from PyTorch's)
        moves a bf16 value on a rounding boundary."""
        operands = self._native_operands()
        folded = self.folded_norm is not None and self.folded_norm.let_through(input)
        if operands is None or folded:
            return TORCH_ACTIVATIONS[activation](self(input))
        cached = self._activated_projection
        if cached is None or cached[0] is not operands or cached[1] != activation:
            weight, bias, norm_weight, eps, _ = operands
            projection = prepare_native_projection(weight, bias, norm_weight, eps, output_activation=activation)
            self._activated_projection = cached = operands, activation, native_projections([projection])
        return native_linear(input, cached[2])[0]

    def folded_projection(
        self, scale: torch.Tensor, outer_eps: float, output_activation: str | None = None
    ) -> NativeProjection:
        """The native kernel's description of this layer behind a folded model norm of per-channel ``scale`` and
        epsilon ``outer_eps`` (:mod:`~st_bitembed.quantization.norm_folding`), with ``output_activation`` applied to
        its outputs (a gated MLP's gate), made again when any of them changes."""
        weight, bias, norm_weight, eps, _ = self._operands()
        cached = self._folded_projection
        if cached is None or cached[0] is not norm_weight or cached[1] is not scale or cached[2] != output_activation:
            projection = prepare_native_projection(
                weight, bias, norm_weight * scale, eps, scale, outer_eps, output_activation
            )
            self._folded_projection = cached = norm_weight, scale, output_activation, projection
        return cached[3]

    def native_projection(self) -> NativeProjection | None:
        """The native kernel's description of this layer where this call would run it (at inference, on a device
        whose GEMM backend is native, no folded norm in front), for callers that run it with other projections of
        the same input in one call (:func:`~st_bitembed.quantization.kernels.native_linear`); else ``None``."""
        operands = self._native_operands()
        return None if operands is None or self.folded_norm is not None else operands.native.members[0]

    def _native_operands(self) -> InferenceOperands | None:
        """The prepared operands where this call runs the native kernel (the int8 kernel at inference, on a device
        whose GEMM backend is native), else ``None``: the layer's own forward then does what it is asked."""
        if self.kernel != "int8" or self.training or torch.is_grad_enabled():
            return None
        operands = self._operands()
        return operands if operands.native is not None else None

    def _operands(self) -> InferenceOperands:
        """The prepared weight, bias and norm weight of the inference path (and the native kernel's description of
        them), made again only when a parameter changes (in place or replaced), the layer moves, or its device's GEMM
        backend changes. One key for all of them: a short query runs every layer on a few tokens (196 calls per
        Qwen3-0.6B forward), where each call's Python work adds up. A layer that is to release its latent weight at
        its first inference does it here."""
        if self.release_at_inference:
            self.release_latent_weight()
        # From the module's own dicts: nn.Module.__getattr__, which `self.weight` goes through, took most of the time.
        latent, bias, norm = self._parameters["weight"], self._parameters.get("bias"), self._modules.get("rms_norm")
        norm_weight = norm.weight if norm is not None else None
        device = latent.device
        backend = gemm_backend(device.type)
        key = (*version_key(latent), *version_key(bias), *version_key(norm_weight), device, backend)
        cached = self._inference_operands
        if cached is not None and cached[0] == key:
            return cached[1]
        weight = self._inference_weight()
        if bias is not None and not self.online_quant:  # offline layers compute (x W + b) * scale
            bias = bias * weight.scale
        # Copies, never views: a view would keep the checkpoint's memory map open (finish_latent_weight_release).
        bias, norm_weight = (
            t.detach().to(torch.float32, copy=True) if t is not None else None for t in (bias, norm_weight)
        )
        eps = self.rms_norm.variance_epsilon if norm_weight is not None else 1e-6
        native = None
        if backend == "native":
            native = native_projections([prepare_native_projection(weight, bias, norm_weight, eps)])
        operands = InferenceOperands(weight, bias, norm_weight, eps, native)
        self._inference_operands = key, operands
        return operands


def version_key(tensor: torch.Tensor | None) -> tuple:
    """What identifies a tensor's current contents for a cache made from it: its storage and in-place version.

    Tensors made in ``torch.inference_mode`` (activations while encoding; parameters of a module built or cast inside
    it) keep no version counter; theirs is their storage alone: in-place changes to them, possible only inside
    inference mode, are not seen. Asked first: reading the missing counter raises, an exception costs far more than
    the question, and a short query asks hundreds of times."""
    if tensor is None:
        return None, None
    if tensor.is_inference():
        return tensor.data_ptr(), None
    return tensor.data_ptr(), tensor._version


def _materialize_in_state_dict(module: BitLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # A released layer saves the latent weight it stands for, never its one-float placeholder.
    if module.latent_weight_released:
        state_dict[prefix + "weight"] = module._weight_from_codes()


def _materialize_before_loading(module: BitLinear, *args: Any, **kwargs: Any) -> None:
    module.materialize_latent_weight()  # loading copies into the weight: it needs its own memory again


def install_bitlinear(model: torch.nn.Module, kernel: Kernel = "int8") -> int:
    """Swap every ``AutoBitLinear`` of ``model`` for :class:`BitLinear` (sharing its parameters) and set ``kernel``
    on all of them. Returns the number of layers."""
    if kernel not in KERNELS:
        raise ValueError(f"Unknown BitLinear kernel {kernel!r}; choose one of {KERNELS}.")
    layers = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, AutoBitLinear):
            if not isinstance(module, BitLinear):
                module = BitLinear.from_autobitlinear(module)
                model.set_submodule(name, module)
            module.kernel = kernel
            layers += 1
    return layers


def release_latent_weights(model: torch.nn.Module, at_first_inference: bool = False) -> int:
    """Free the float latent weights of every :class:`BitLinear` in ``model``, keeping their int8 codes (for
    inference): now, or with ``at_first_inference`` when each layer first runs its inference path, unless the model
    is put in training mode before (so that a model loaded only to read its state, as a trainer resuming from a
    checkpoint does, keeps its exact latent weights). Returns the number of layers."""
    layers = [module for module in model.modules() if isinstance(module, BitLinear)]
    for layer in layers:
        if at_first_inference:
            layer.release_at_inference = True
        else:
            layer.release_latent_weight()
    return len(layers)


@torch.no_grad()
def cast_around_codes(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters to ``dtype`` as ``from_pretrained(..., dtype=dtype)`` would, for a model
    whose :class:`BitLinear` layers have released their latent weights: their codes (taken from the float32 latent
    weights) stay as they are, and their one-float placeholder takes the dtype without being materialised. Modules
    transformers keeps in float32 (``_keep_in_fp32_modules``, ``_keep_in_fp32_modules_strict``) stay in float32.
    The float32 tensors replaced (views of the checkpoint's memory map, for a freshly loaded model) are freed and the
    memory given back."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for module_name, module in model.named_modules():
        if any(part in keep for part in module_name.split(".")):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.is_floating_point():
                continue
            if isinstance(module, BitLinear) and name == "weight" and module.latent_weight_released:
                parameter.data = torch.zeros(1, dtype=dtype, device=parameter.device).expand(parameter.shape)
            else:
                parameter.data = parameter.data.to(dtype)
    return_freed_memory()


@torch.inference_mode(False)  # called while encoding, in inference mode: copies made there could never train
@torch.no_grad()
def finish_latent_weight_release(modules: list[torch.nn.Module]) -> bool:
    """Once every :class:`BitLinear` in ``modules`` has freed its latent weight, let the process's memory shrink
    by what they held. Returns whether that is done: now, or there is nothing to wait for (a layer keeps its latent
    weight: the model trains).

    A training-form checkpoint holds the float latent weights themselves: transformers loads safetensors weights as
    views of the file's memory map, which stays open while any of them lives, and the freed latent weights' pages
    with it (resident, counted in the process's memory). So the other parameters and buffers (embeddings, norms,
    biases) are copied into process memory, and the map closes. An exported (2-bit packed) checkpoint holds only
    the packed codes, which transformers unpacked into process memory: its map stays, and an embedding table read
    from it keeps only the rows that texts use resident. Then glibc's allocator is asked to return the freed
    memory to the system (it otherwise keeps freed blocks of a few MiB, which stay resident).
    """
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, BitLinear)]
    if not all(layer.latent_weight_released for layer in layers):
        return not all(layer.release_at_inference for layer in layers)
    if any(layer.online_quant for layer in layers):
        latent = {id(layer.weight) for layer in layers}
        for module in (child for module in modules for child in module.modules()):
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in latent:
                    parameter.data = parameter.data.clone()
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.clone())
    return_freed_memory()
    return True
