"""BitEmbed: a SentenceTransformer whose backbone has ternary weights and 8-bit activations."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Transformer
from sentence_transformers.util import import_from_string, load_file_path

from st_bitembed import __version__
from st_bitembed.card import BitEmbedModelCardData, write_model_card
from st_bitembed.conversion import convert_backbone
from st_bitembed.modules.quantize import Quantize
from st_bitembed.precisions import Precision, PrecisionName, get_precision
from st_bitembed.quantization.bitlinear import (
    Kernel,
    cast_around_codes,
    finish_latent_weight_release,
    install_bitlinear,
    release_latent_weights,
)
from st_bitembed.quantization.inference_fusions import use_fused_inference
from st_bitembed.saving import staged_folder
from st_bitembed.sub_batches import join_outputs, split_batch, widest_activation_bytes_per_token

PLUGIN_NAMESPACE = "st_bitembed."
# The Quantize head lives in its own folder, outside modules.json, so vanilla sentence-transformers ignores it.
QUANTIZE_FOLDER = "quantize"
QUANTIZE_STATE_PREFIX = "quantize_head."
# What the model card tells about training (the recipe's stages), kept beside the model.
BITEMBED_INFO_FILE = "bitembed.json"
# Dtypes whose rounding of float32 latent weights would move some of their ternary codes (see BitEmbed.__init__).
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


class BitEmbed(SentenceTransformer):
    """A BitNet text-embedding model: a ``SentenceTransformer`` with W1.58A8 ``BitLinear`` projections.

    Build one from any Hugging Face backbone with :meth:`from_backbone`; load a saved one with ``BitEmbed(path)``.
    A model converted with ``norm="all"`` (the default) saves as a standard transformers BitNet checkpoint, so
    vanilla ``SentenceTransformer(path)`` loads it too, without this package.

    Example:
        ::

            from st_bitembed import BitEmbed

            model = BitEmbed.from_backbone("Qwen/Qwen3-0.6B")  # ternary weights, last-token pooling on <|endoftext|>
            embeddings = model.encode(["The weather is lovely today.", "It's so sunny outside!"])
            codes = model.encode(["The weather is lovely today."], precision="int4", pack=True)  # 2 codes per byte
            model.save("bitembed-qwen3-0.6b")
    """

    def __init__(
        self, model_name_or_path: str | None = None, *, keep_latent_weights: bool = False, **kwargs: Any
    ) -> None:
        """Load a saved BitEmbed model (or build one from ``modules``), as ``SentenceTransformer`` does.

        Args:
            model_name_or_path: A local folder or Hub id of a BitEmbed (or any sentence-transformers) model.
            keep_latent_weights: Keep the float latent weights of the BitLinear layers beside their ternary codes, to
                continue training exactly where the saved model stopped. By default a loaded model frees them when it
                first encodes and keeps only the int8 codes (a quarter of the float32 memory): it encodes the same,
                and training it afterwards starts from latent weights rebuilt from the codes (see
                :class:`~st_bitembed.quantization.bitlinear.BitLinear`). A model put in training mode before it
                encodes keeps its latent weights.
            kwargs: As for ``SentenceTransformer``. ``model_kwargs={"dtype": torch.bfloat16}`` (or float16) runs the
                model in that dtype, as it does for any sentence-transformers model: embeddings, norms, attention and
                activations. The ternary codes of a saved training-form model (float32 latent weights) are still
                those of its float32 weights: it loads in float32, keeps only the codes at once, then casts the rest
                (loading the latent weights in bf16 would round some of them across a ternary threshold). With
                ``keep_latent_weights=True`` the dtype applies to the latent weights as given.
        """
        self._quantize_head: Quantize | None = None  # before super().__init__, which already moves the model
        self._releasing_latent_weights = False
        self._encoding_in_parts = False  # set while encode runs (see forward)
        card_data = kwargs.pop("model_card_data", None) or BitEmbedModelCardData()
        if not isinstance(card_data, BitEmbedModelCardData):
            raise TypeError(
                f"model_card_data must be a BitEmbedModelCardData (st_bitembed.card), got {type(card_data).__name__}."
            )
        hub_kwargs = {key: kwargs.get(key) for key in ("token", "cache_folder", "revision")}
        inference_dtype = None
        if model_name_or_path is not None and not keep_latent_weights:
            inference_dtype = _codes_first_dtype(model_name_or_path, kwargs, hub_kwargs)
            if inference_dtype is not None:  # loaded in float32; the codes are kept, then the rest is cast
                model_kwargs = {k: v for k, v in kwargs["model_kwargs"].items() if k not in ("dtype", "torch_dtype")}
                kwargs["model_kwargs"] = {**model_kwargs, "dtype": torch.float32}
        with _without_cpu_unpacking_warning():
            super().__init__(model_name_or_path, model_card_data=card_data, **kwargs)
        info_file = model_name_or_path and load_file_path(
            model_name_or_path,
            BITEMBED_INFO_FILE,
            local_files_only=kwargs.get("local_files_only", False),
            **hub_kwargs,
        )
        if info_file:
            with open(info_file, encoding="utf8") as file:
                self.model_card_data.training_recipe = json.load(file).get("training_recipe")

        def saved_file(name: str) -> str | None:
            if model_name_or_path is None:
                return None
            local_only = kwargs.get("local_files_only", False)
            return load_file_path(model_name_or_path, name, local_files_only=local_only, **hub_kwargs)

        has_saved_head = saved_file(f"{QUANTIZE_FOLDER}/config.json")
        if not has_saved_head and saved_file(f"{QUANTIZE_FOLDER}/model.safetensors"):
            raise ValueError(
                f"{model_name_or_path!r} has trained Quantize head weights ({QUANTIZE_FOLDER}/model.safetensors) but "
                f"no {QUANTIZE_FOLDER}/config.json: the head cannot be rebuilt. Restore that file from the original "
                "model (it holds the embedding dimension), or copy the model again."
            )
        if isinstance(self[0] if len(self) else None, Transformer):
            layers = install_bitlinear(self[0].auto_model)  # integer inference; training runs transformers' forward
            if layers:
                use_fused_inference(self[0].auto_model)
            if layers == 0 and (has_saved_head or info_file):
                raise ValueError(
                    f"{model_name_or_path!r} is a BitEmbed model (it has {QUANTIZE_FOLDER}/ or {BITEMBED_INFO_FILE}) "
                    "but its backbone loaded with no BitNet layers: its config.json lacks the 'quantization_config' "
                    "entry that makes transformers build them. Restore config.json from the original model."
                )
            if inference_dtype is not None:
                release_latent_weights(self[0].auto_model)  # the codes of the float32 latent weights
                cast_around_codes(self[0].auto_model, inference_dtype)
            elif model_name_or_path is not None and not keep_latent_weights:
                # Freed at the first inference, then the memory they held is given back (finish_latent_weight_release).
                released = release_latent_weights(self[0].auto_model, at_first_inference=True)
                self._releasing_latent_weights = released > 0
        if has_saved_head:
            head = Quantize.load(
                model_name_or_path,
                subfolder=QUANTIZE_FOLDER,
                local_files_only=kwargs.get("local_files_only", False),
                **hub_kwargs,
            )
        elif self.get_embedding_dimension():
            head = Quantize(self.get_embedding_dimension())
        else:
            head = None
        if model_name_or_path is not None:
            check_finite_weights(self, head, model_name_or_path)
        # Not a registered child: SentenceTransformer runs and saves every child as a pipeline module.
        object.__setattr__(self, "_quantize_head", head.to(self.device) if head is not None else None)

    # Conversion lives in st_bitembed.conversion; this is its entry point on the class.
    from_backbone = classmethod(convert_backbone)

    def encode(
        self,
        inputs: Any,
        *args: Any,
        precision: PrecisionName | Precision = "float32",
        pack: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        output_value: str | None = "sentence_embedding",
        **kwargs: Any,
    ) -> Any:
        """``SentenceTransformer.encode`` with every storage precision of the Quantize head.

        On CPU, a batch whose MLP activations would pass 8 MiB runs in parts (:mod:`st_bitembed.sub_batches`), with
        less memory and fewer page faults: each text gets the embedding the whole batch gives it (bit for bit on the
        native kernels).

        Args:
            precision: One of :data:`st_bitembed.PRECISIONS`: "float32", "float16", "bfloat16", "int8", "uint8",
                "int4", "int2", "binary", "ubinary". Codes come from the model's own (trained) head, so a text's
                codes never depend on the rest of the batch.
            pack: For int4 / int2, return uint8 bytes with 2 / 4 codes each instead of one int8 code per dimension.
                Binary and ubinary are always packed 8 dimensions per byte, as in sentence-transformers.
            Other arguments as for ``SentenceTransformer.encode``.
        """
        with self._large_batches_in_parts():
            return self._encode(inputs, *args, precision=precision, pack=pack, convert_to_numpy=convert_to_numpy,
                                convert_to_tensor=convert_to_tensor, output_value=output_value, **kwargs)  # fmt: skip

    def _encode(
        self,
        inputs: Any,
        *args: Any,
        precision: PrecisionName | Precision,
        pack: bool,
        convert_to_numpy: bool,
        convert_to_tensor: bool,
        output_value: str | None,
        **kwargs: Any,
    ) -> Any:
        precision = get_precision(precision)
        if isinstance(inputs, (list, tuple)) and not inputs and output_value == "sentence_embedding":
            embeddings = torch.empty(0, self.get_embedding_dimension(), device=self.quantizer.device)
            return self._codes_as_requested(embeddings, precision, pack, convert_to_numpy, convert_to_tensor)
        if precision.name == "float32":
            embeddings = super().encode(
                inputs,
                *args,
                convert_to_numpy=convert_to_numpy,
                convert_to_tensor=convert_to_tensor,
                output_value=output_value,
                **kwargs,
            )
            if output_value == "sentence_embedding":
                check_finite(embeddings, precision)
            return embeddings
        if output_value != "sentence_embedding":
            raise ValueError(
                f"precision={precision.name!r} applies to sentence embeddings, not output_value={output_value!r}."
            )
        embeddings = super().encode(
            inputs, *args, convert_to_numpy=False, convert_to_tensor=True, output_value=output_value, **kwargs
        )
        check_finite(embeddings, precision)
        return self._codes_as_requested(embeddings, precision, pack, convert_to_numpy, convert_to_tensor)

    def forward(self, input: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        # Only encode's batches run in parts: other callers (training, calibration's hooks) see one forward of theirs.
        parts = self._inference_parts(input) if self._encoding_in_parts else None
        if parts is None:
            output = super().forward(input, **kwargs)
        else:  # a large CPU batch, in parts whose activations glibc serves from memory it keeps
            outputs = [super(BitEmbed, self).forward(part, **kwargs) for part in parts]
            output = join_outputs(outputs, [len(part["attention_mask"]) for part in parts])
        if self._releasing_latent_weights:  # until the latent weights are freed at the first inference
            head = [self._quantize_head] if self._quantize_head is not None else []
            self._releasing_latent_weights = not finish_latent_weight_release([self, *head])
        return output

    @contextmanager
    def _large_batches_in_parts(self) -> Iterator[None]:
        encoding, self._encoding_in_parts = self._encoding_in_parts, True
        try:
            yield
        finally:
            self._encoding_in_parts = encoding

    def _inference_parts(self, features: dict[str, Any]) -> list[dict[str, Any]] | None:
        """``features`` as the parts :mod:`st_bitembed.sub_batches` runs a large batch in on CPU; ``None``: the
        batch runs whole."""
        backbone = getattr(self[0], "auto_model", None)
        if self.device.type != "cpu" or backbone is None:
            return None
        return split_batch(features, widest_activation_bytes_per_token(backbone))

    def _codes_as_requested(
        self,
        embeddings: torch.Tensor,
        precision: Precision,
        pack: bool,
        convert_to_numpy: bool,
        convert_to_tensor: bool,
    ) -> Any:
        codes = self.quantizer.quantize(embeddings.to(self.quantizer.device), precision, pack)
        if convert_to_tensor:
            return codes
        if convert_to_numpy:
            return codes.cpu().float().numpy() if codes.dtype == torch.bfloat16 else codes.cpu().numpy()
        return list(codes)

    def set_bitlinear_kernel(self, kernel: Kernel) -> None:
        """``"int8"`` (default): inference runs int8 x ternary integer GEMMs (the native ternary kernel on CPUs with
        AVX2, else FBGEMM; oneDNN on CPUs with AMX; cuBLASLt on CUDA; the exact float32 product of the codes
        elsewhere; see :mod:`st_bitembed.quantization.kernels`); ``"reference"``: always transformers' float forward
        (the arithmetic every kernel is tested against). Training always uses the latter."""
        install_bitlinear(self[0].auto_model, kernel)

    def release_latent_weights(self) -> None:
        """Free the BitLinear layers' float latent weights and keep their int8 codes, as ``BitEmbed(path)`` does:
        for a model built with :meth:`from_backbone` and trained in this process, before deploying it."""
        release_latent_weights(self[0].auto_model)

    def bytes_per_vector(self, precision: PrecisionName | Precision) -> int:
        """Bytes one embedding takes at ``precision`` (e.g. 1024 dims: 2048 at float16, 512 at int4, 128 binary)."""
        return self.quantizer.bytes_per_vector(precision, self.get_embedding_dimension())

    def calibrate_quantizer(self, texts: Sequence[str], batch_size: int = 32) -> None:
        """Fit the Quantize head's ranges to the float embeddings of ``texts`` (a few hundred is plenty)."""
        embeddings = super().encode(list(texts), batch_size=batch_size, convert_to_tensor=True)
        self.quantizer.calibrate(embeddings)

    def save(self, path: str, model_name: str | None = None, create_model_card: bool = True, **kwargs: Any) -> None:
        """Save as ``SentenceTransformer.save`` does, plus the Quantize head (``quantize/``) and a BitEmbed model card
        (with this model's evaluation results, if :func:`~st_bitembed.evaluation.evaluate_precisions` ran on it).

        The files are written into a hidden sibling folder first and moved into ``path`` when all are written
        (:func:`st_bitembed.saving.staged_folder`): a save that is interrupted leaves a model already in ``path``
        intact, and a model saved over another one replaces all of its weights (other files in ``path`` stay).
        """
        if path is None:
            return super().save(path, model_name=model_name, create_model_card=create_model_card, **kwargs)
        repo_id = model_name or os.path.basename(os.path.normpath(path))
        with staged_folder(path) as staging:
            super().save(str(staging), model_name=model_name, create_model_card=create_model_card, **kwargs)
            if any(type(module).__module__.startswith(PLUGIN_NAMESPACE) for module in self):
                # Loading needs this package: vanilla sentence-transformers then names it instead of failing.
                config_file = staging / "config_sentence_transformers.json"
                config = json.loads(config_file.read_text(encoding="utf8"))
                config["requirements"] = {"st_bitembed": f">={__version__}"}
                config_file.write_text(json.dumps(config, indent=2), encoding="utf8")
            if self._quantize_head is not None:
                (staging / QUANTIZE_FOLDER).mkdir()
                self._quantize_head.save(str(staging / QUANTIZE_FOLDER))
            if self.model_card_data.training_recipe:
                with open(staging / BITEMBED_INFO_FILE, "w", encoding="utf8") as file:
                    json.dump({"training_recipe": self.model_card_data.training_recipe}, file, indent=2)
            if create_model_card and self._quantize_head is not None:
                write_model_card(self, staging, self.model_card_data.evaluation_report, repo_id=repo_id)

    # The Quantize head. It is not a registered child (sentence-transformers runs and saves every child as a pipeline
    # module, and vanilla sentence-transformers must load the model without it), so these four members are the one
    # place that makes it follow the model: device and dtype moves, state dicts (trainer checkpoints), and access.
    # Under DDP, MultiPrecisionLoss (which registers it for the optimizer) averages its gradients.

    @property
    def quantizer(self) -> Quantize:
        """The Quantize head that turns float embeddings into codes for every storage precision."""
        if self._quantize_head is None:
            raise ValueError("This model has no Quantize head: its embedding dimension is unknown.")
        return self._quantize_head

    def set_quantizer(self, head: Quantize) -> None:
        """Replace the Quantize head (e.g. by a nested one, ``Quantize(dim, nested=True)``); it moves to the model's
        device and is saved with the model."""
        if head.embedding_dimension != self.get_embedding_dimension():
            raise ValueError(
                f"The head quantizes {head.embedding_dimension} dimensions; this model's embeddings have "
                f"{self.get_embedding_dimension()}."
            )
        object.__setattr__(self, "_quantize_head", head.to(self.device))

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> BitEmbed:
        # .to() / .half() / .cuda() reach the head, which is not a registered child.
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "_quantize_head", None) is not None:
            self._quantize_head._apply(fn, *args, **kwargs)
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        # The head's parameters travel with the model's, so trainer checkpoints resume them too.
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._quantize_head is not None:
            for key, value in self._quantize_head.state_dict(keep_vars=keep_vars).items():
                state[prefix + QUANTIZE_STATE_PREFIX + key] = value
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        head_state = {
            k[len(QUANTIZE_STATE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(QUANTIZE_STATE_PREFIX)
        }
        rest = {k: v for k, v in state_dict.items() if not k.startswith(QUANTIZE_STATE_PREFIX)}
        result = super().load_state_dict(rest, strict=strict, assign=assign)
        if head_state and self._quantize_head is not None:
            self._quantize_head.load_state_dict(head_state, strict=strict, assign=assign)
        return result

    def _load_module_class_from_ref(self, class_ref: str, *args: Any, **kwargs: Any) -> type:
        # This package's own modules need no trust_remote_code under BitEmbed: the user already imported it.
        # (sentence-transformers' only public way, trust_remote_code=True, would also run a repository's own code.)
        if class_ref.startswith(PLUGIN_NAMESPACE):
            return import_from_string(class_ref)
        return super()._load_module_class_from_ref(class_ref, *args, **kwargs)


def _codes_first_dtype(model_name_or_path: str, kwargs: dict[str, Any], hub_kwargs: dict[str, Any]) -> Any:
    """The reduced dtype (bf16 / fp16) asked for in ``model_kwargs`` when the model is a training-form BitNet
    checkpoint (float latent weights, ``quantization_mode: online``), whose codes must come from float32; else None."""
    model_kwargs = kwargs.get("model_kwargs") or {}
    dtype = model_kwargs.get("dtype", model_kwargs.get("torch_dtype"))
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if dtype not in REDUCED_DTYPES:
        return None
    config_file = load_file_path(
        model_name_or_path, "config.json", local_files_only=kwargs.get("local_files_only", False), **hub_kwargs
    )
    if not config_file:
        return None
    with open(config_file, encoding="utf8") as file:
        quantization = json.load(file).get("quantization_config") or {}
    online = quantization.get("quant_method") == "bitnet" and quantization.get("quantization_mode") == "online"
    return dtype if online else None


@contextmanager
def _without_cpu_unpacking_warning() -> Iterator[None]:
    """Drop transformers' "no GPU ... slow because of weight unpacking" warning while BitEmbed loads a model: BitEmbed
    prepares each layer's integer weights once and unpacks nothing per forward. Other warnings pass."""
    bitnet_logger = logging.getLogger("transformers.quantizers.quantizer_bitnet")

    def keep(record: logging.LogRecord) -> bool:
        return "weight unpacking" not in record.getMessage()

    bitnet_logger.addFilter(keep)
    try:
        yield
    finally:
        bitnet_logger.removeFilter(keep)


def check_finite_weights(model: torch.nn.Module, head: torch.nn.Module | None, source: str) -> None:
    """Refuse a model whose loaded weights hold NaN or infinities (a damaged file), naming the first such tensor.

    Embedding tables are not scanned: they stay in the checkpoint's memory map, read row by row as texts use their
    tokens, and a scan would make the whole table resident (~330 MiB for Gemma3's 262k x 640 in bf16) and double
    the peak while loading. A damaged row surfaces in the embeddings of the texts that use it, which ``encode``
    refuses (:func:`check_finite`)."""
    tables = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    named = [(name, p) for name, p in [*model.named_parameters(), *model.named_buffers()] if id(p) not in tables]
    named += [(f"{QUANTIZE_FOLDER}/{name}", p) for name, p in (head.named_parameters() if head is not None else [])]
    for name, tensor in named:
        # A float32 sum is NaN or infinite exactly when a value is (real weights are far too small to overflow it).
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor.sum(dtype=torch.float32)):
            raise ValueError(
                f"The weights loaded from {source!r} hold NaN or infinite values ({name}): a weights file "
                f"(model.safetensors, or {QUANTIZE_FOLDER}/model.safetensors for the head) is damaged. Download or "
                "copy the model again."
            )


def check_finite(embeddings: Any, precision: Precision) -> None:
    """Refuse to turn NaN or infinite embeddings into codes (they would look like ordinary ones)."""
    if isinstance(embeddings, list) and not embeddings:
        return
    values = torch.stack(embeddings) if isinstance(embeddings, list) else torch.as_tensor(embeddings)
    if values.numel() and not torch.isfinite(values).all():
        rows = values.reshape(-1, values.shape[-1])  # one row per text
        damaged = int((~torch.isfinite(rows)).any(dim=-1).sum())
        raise ValueError(
            f"{damaged} of {len(rows)} embeddings are NaN or infinite (precision={precision.name!r}): the model's "
            "weights are damaged or overflow in this dtype. Reload the model from an intact copy, or run it in "
            "float32."
        )
