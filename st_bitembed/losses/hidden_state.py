"""Token-level hidden-state distillation: every student block's output pulled toward the teacher's, token by token."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from st_bitembed.losses.attention_relation import capture_outputs, transformer_blocks, unwrapped
from st_bitembed.losses.info_nce import BITEMBED_CITATION
from st_bitembed.losses.teacher import describe_tokenizer, freeze, same_tokenizer
from st_bitembed.losses.term import TermNeeds


def aligned_teacher_layers(student_layers: Sequence[int], student_depth: int, teacher_depth: int) -> list[int]:
    """The teacher block each student block learns from: the same block at equal depth, else the block at the same
    relative depth (student block ``i`` of ``S`` -> teacher block ``round((i + 1) * T / S) - 1``; the last block
    always maps to the last)."""
    return [round((layer % student_depth + 1) * teacher_depth / student_depth) - 1 for layer in student_layers]


@dataclass
class StudentForwards:
    """What the student's transformer saw and produced in one training step, one entry per forward call (the
    columns of a step may run one by one or merged into one batch)."""

    features: list[dict[str, Any]] = field(default_factory=list)
    block_outputs: dict[int, list[Tensor]] = field(default_factory=dict)


def block_hidden_states(output: Any) -> Tensor:
    """A transformer block's hidden states, whether it returns a tensor or a tuple that starts with them."""
    return output[0] if isinstance(output, tuple) else output


def token_cosine_distance(student: Tensor, teacher: Tensor, attention_mask: Tensor) -> Tensor:
    """``1 - cos`` between the student's and the teacher's hidden state of every real (unpadded) token, averaged.

    Cosine rather than squared error: it ignores each token's norm, so a few outlier dimensions of a decoder's
    residual stream (or the first token's) do not drown every other token's signal.
    """
    mask = attention_mask.bool()
    distance = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return distance[mask].mean()


class HiddenStateDistillLoss(nn.Module):
    """Distill the teacher's hidden states token by token into the student, at chosen transformer blocks.

    Each chosen student block's output is compared with the output of the teacher block at the same relative depth,
    for every real token of every text in the batch, as ``1 - cosine`` averaged over tokens and blocks. The teacher
    runs on exactly the student's inputs (so both must share the tokenizer and the hidden size): the densest signal
    per step when the teacher is the backbone's own full-precision model, as in the default recipe (thousands of
    token targets per step against one pooled vector per text).

    Args:
        model: The student.
        teacher: A frozen full-precision SentenceTransformer with the student's tokenizer and hidden size.
        layers: Student blocks to distill (negative counts from the end); by default all of them.

    References:
        - TinyBERT: Distilling BERT for Natural Language Understanding: https://arxiv.org/abs/1909.10351
        - BitNet Distillation: https://arxiv.org/abs/2510.13998

    Inputs:
        +------------------------------------------+--------+
        | Texts                                    | Labels |
        +==========================================+========+
        | any number of text columns               | none   |
        +------------------------------------------+--------+

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from st_bitembed import BitEmbed
            from st_bitembed.losses import HiddenStateDistillLoss

            teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            model = BitEmbed.from_backbone("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({"text": ["It's nice weather outside today.", "He drove to work."]})
            loss = HiddenStateDistillLoss(model, teacher)
            SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
    """

    needs: ClassVar[TermNeeds] = TermNeeds(teacher=True, teacher_in_loss=True, same_tokenizer=True)

    @staticmethod
    def describe(options: Mapping[str, Any], teacher: str | None) -> str:
        layers = options.get("hidden_state_layers")
        blocks = "all blocks" if layers is None else f"blocks {list(layers)}"
        return f"token-level hidden-state distillation ({blocks}) from {teacher}"

    def __init__(
        self, model: SentenceTransformer, teacher: SentenceTransformer, layers: Iterable[int] | None = None
    ) -> None:
        super().__init__()
        if not same_tokenizer(model.tokenizer, teacher.tokenizer):
            raise ValueError(
                "HiddenStateDistillLoss compares the hidden states of the same tokens, so teacher and student must "
                f"share a tokenizer: the student uses {describe_tokenizer(model)}, the teacher "
                f"{describe_tokenizer(teacher)}. Use a teacher with the student's tokenizer, or turn hidden-state "
                "distillation off."
            )
        student_size = model[0].auto_model.config.hidden_size
        teacher_size = teacher[0].auto_model.config.hidden_size
        if student_size != teacher_size:
            raise ValueError(
                f"HiddenStateDistillLoss needs equal hidden sizes; the student's is {student_size}, the teacher's "
                f"{teacher_size}. Turn hidden-state distillation off for this teacher."
            )
        self.model = model
        self.teacher = freeze(teacher)
        depth = len(transformer_blocks(model))
        self.layers = sorted({layer % depth for layer in (range(depth) if layers is None else layers)})
        if not self.layers or any(not -depth <= layer < depth for layer in layers or []):
            raise ValueError(f"layers must name blocks of the student's {depth}, got {layers}.")
        self.teacher_layers = aligned_teacher_layers(self.layers, depth, len(transformer_blocks(teacher)))

    @contextmanager
    def capture_student(self) -> Iterator[StudentForwards]:
        """Record the student's inputs and chosen block outputs on every forward within the block."""
        student = unwrapped(self.model)
        blocks = transformer_blocks(student)
        forwards = StudentForwards()
        handle = student[0].register_forward_hook(
            lambda _module, args, _output: forwards.features.append(dict(args[0]))
        )
        try:
            with capture_outputs({layer: blocks[layer] for layer in self.layers}) as outputs:
                forwards.block_outputs = outputs
                yield forwards
        finally:
            handle.remove()

    @torch.no_grad()
    def teacher_outputs(self, features: dict[str, Any]) -> tuple[dict[int, Tensor], Tensor]:
        """Run the teacher on the student's inputs of one forward: its chosen block outputs (keyed by student block)
        and its sentence embeddings."""
        self.teacher.eval()
        blocks = transformer_blocks(self.teacher)
        modules = {layer: blocks[t] for layer, t in zip(self.layers, self.teacher_layers)}
        inputs = {key: features[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in features}
        with capture_outputs(modules) as outputs:
            embeddings = self.teacher(inputs)["sentence_embedding"]
        return {layer: block_hidden_states(captured[0]) for layer, captured in outputs.items()}, embeddings

    def compute_loss_from_forwards(self, forwards: StudentForwards) -> tuple[Tensor, Tensor]:
        """Mean over the student's forwards and chosen blocks of the token cosine distance to the teacher, and the
        teacher's sentence embeddings of every row of those forwards (in their order: other terms reuse them)."""
        losses, teacher_embeddings = [], []
        for call, features in enumerate(forwards.features):
            teacher, embeddings = self.teacher_outputs(features)
            teacher_embeddings.append(embeddings)
            for layer in self.layers:
                student = block_hidden_states(forwards.block_outputs[layer][call])
                losses.append(token_cosine_distance(student, teacher[layer], features["attention_mask"]))
        return torch.stack(losses).mean(), torch.cat(teacher_embeddings)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        with self.capture_student() as forwards:
            for features in sentence_features:
                self.model(features)
        return self.compute_loss_from_forwards(forwards)[0]

    def get_config_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "teacher_layers": self.teacher_layers}

    @property
    def citation(self) -> str:
        return BITEMBED_CITATION
