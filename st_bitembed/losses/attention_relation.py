"""MiniLMv2 self-attention relation distillation (Q-Q, K-K, V-V) from a full-precision teacher."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from st_bitembed.losses.info_nce import BITEMBED_CITATION
from st_bitembed.losses.teacher import describe_tokenizer, freeze, same_tokenizer
from st_bitembed.losses.term import TermNeeds
from st_bitembed.quantization.convert import find_transformer_blocks

RELATIONS: tuple[str, ...] = ("query", "key", "value")
# Names of the Q / K / V projections in Llama-style (q_proj) and BERT-style (query) attention blocks.
PROJECTION_NAMES: dict[str, tuple[str, ...]] = {
    "query": ("q_proj", "query"),
    "key": ("k_proj", "key"),
    "value": ("v_proj", "value"),
}


def transformer_blocks(model: SentenceTransformer) -> nn.ModuleList:
    """The transformer blocks of a SentenceTransformer's backbone, in order."""
    backbone = model[0].auto_model
    return backbone.get_submodule(find_transformer_blocks(backbone))


def unwrapped(model: nn.Module) -> nn.Module:
    """A loss's student as built: under DDP the trainer swaps ``loss.model`` for its wrapper, while the modules that
    hooks go on live on the wrapped model."""
    return getattr(model, "module", model)


def projection_modules(model: SentenceTransformer, layer: int) -> dict[str, nn.Module]:
    """The Q, K and V projection modules of transformer block ``layer`` (negative counts from the end)."""
    block = transformer_blocks(model)[layer]
    found = {}
    for relation, names in PROJECTION_NAMES.items():
        matches = [module for name, module in block.named_modules() if name.rsplit(".", 1)[-1] in names]
        if len(matches) != 1:
            raise ValueError(
                f"Block {layer} of {type(model[0].auto_model).__name__} has {len(matches)} modules named {names}; "
                "AttentionRelationLoss needs exactly one Q, K and V projection per block."
            )
        found[relation] = matches[0]
    return found


@contextmanager
def capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """Record the output of each module on every call, with forward hooks (attention kernels stay untouched)."""
    captured: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(lambda _module, _args, output, name=name: captured[name].append(output))
        for name, module in modules.items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def relation_log_probabilities(projection: Tensor, relation_heads: int, mask: Tensor) -> Tensor:
    """Log-softmax over keys of scaled dot products within ``relation_heads`` heads: ``[B, R, L, L]``.

    ``projection`` is ``[B, L, D]`` (all attention heads concatenated), re-split into ``relation_heads`` heads of
    ``D / relation_heads``; padded keys (``mask`` False) get no probability.
    """
    batch, length, dimension = projection.shape
    heads = projection.float().view(batch, length, relation_heads, dimension // relation_heads).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(dimension // relation_heads)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(student: Tensor, teacher: Tensor, relation_heads: int, attention_mask: Tensor) -> Tensor:
    """KL(teacher || student) of one relation, averaged over heads and real (unpadded) query positions."""
    mask = attention_mask.bool()
    student_log = relation_log_probabilities(student, relation_heads, mask)
    teacher_log = relation_log_probabilities(teacher, relation_heads, mask)
    pointwise = teacher_log.exp() * (teacher_log - student_log)
    per_query = pointwise.masked_fill(~mask[:, None, None, :], 0.0).sum(-1)  # [B, R, L]
    query_mask = mask[:, None, :].expand_as(per_query)
    return per_query[query_mask].mean()


def default_relation_heads(dimensions: Iterable[int], preferred: int) -> int:
    """The largest number of relation heads, at most ``preferred``, that divides every projection dimension."""
    dimensions = list(dimensions)
    return next(heads for heads in range(preferred, 0, -1) if all(d % heads == 0 for d in dimensions))


class AttentionRelationLoss(nn.Module):
    """MiniLMv2 self-attention relation distillation from a full-precision teacher.

    For each of the Q, K and V projections of one teacher layer and one student layer, all attention heads are
    concatenated and re-split into ``relation_heads`` relation heads; each relation head's scaled dot products,
    softmaxed over keys, give a token-to-token distribution, and the loss is KL(teacher || student) averaged over
    Q-Q, K-K and V-V, heads and real tokens (padding masked out). Projections are captured with forward hooks, so
    sdpa / flash attention kernels keep working. Teacher and student may differ in hidden size and head count
    (relations are ``L x L`` whatever the head size), but must share the tokenizer so that positions align.

    It distills relations on the first text column (the queries/anchors).

    Args:
        model: The student.
        teacher: A frozen full-precision SentenceTransformer with the student's tokenizer.
        teacher_layer: Teacher block to distill from (negative counts from the end).
        student_layer: Student block to distill into; by default the last (MiniLMv2 for small students).
        relation_heads: Relation heads; by default the most, up to the student's attention heads, dividing every
            projection dimension of both models.
        relations: Which of "query", "key", "value" to distill.

    References:
        - MiniLMv2: Multi-Head Self-Attention Relation Distillation: https://arxiv.org/abs/2012.15828
        - BitNet Text Embeddings: https://arxiv.org/abs/2606.25674

    Inputs:
        +------------------------------------------+--------+
        | Texts                                    | Labels |
        +==========================================+========+
        | (anchor, ...) any number of text columns | none   |
        +------------------------------------------+--------+

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from st_bitembed import BitEmbed
            from st_bitembed.losses import AttentionRelationLoss

            teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            model = BitEmbed.from_backbone("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({"anchor": ["It's nice weather outside today.", "He drove to work."]})
            loss = AttentionRelationLoss(model, teacher)
            SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
    """

    needs: ClassVar[TermNeeds] = TermNeeds(teacher=True, teacher_in_loss=True, same_tokenizer=True)

    @staticmethod
    def describe(options: Mapping[str, Any], teacher: str | None) -> str:
        layers = f"layer {options.get('teacher_layer', -1)} -> {options.get('student_layer', -1)}"
        return f"attention-relation distillation ({layers}) from {teacher}"

    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer,
        teacher_layer: int = -1,
        student_layer: int = -1,
        relation_heads: int | None = None,
        relations: Iterable[str] = RELATIONS,
    ) -> None:
        super().__init__()
        self.relations = tuple(relations)
        if not self.relations or set(self.relations) - set(RELATIONS):
            raise ValueError(f"relations must be a non-empty subset of {RELATIONS}, got {self.relations}.")
        if not same_tokenizer(model.tokenizer, teacher.tokenizer):
            raise ValueError(
                "AttentionRelationLoss compares token-to-token relations, so teacher and student must share a "
                f"tokenizer: the student uses {describe_tokenizer(model)}, the teacher {describe_tokenizer(teacher)}. "
                "Use a teacher with the student's tokenizer, or turn attention-relation distillation off."
            )
        self.model = model
        self.teacher = freeze(teacher)
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer
        dimensions = [
            module.out_features
            for modules in (self.student_projections(), self.teacher_projections())
            for module in modules.values()
        ]
        preferred = getattr(model[0].auto_model.config, "num_attention_heads", 1)
        self.relation_heads = relation_heads or default_relation_heads(dimensions, preferred)
        if any(d % self.relation_heads for d in dimensions):
            raise ValueError(
                f"relation_heads={self.relation_heads} must divide every Q/K/V projection dimension ({dimensions})."
            )

    def student_projections(self) -> dict[str, nn.Module]:
        return {
            r: m
            for r, m in projection_modules(unwrapped(self.model), self.student_layer).items()
            if r in self.relations
        }

    def teacher_projections(self) -> dict[str, nn.Module]:
        return {r: m for r, m in projection_modules(self.teacher, self.teacher_layer).items() if r in self.relations}

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = next(iter(sentence_features))
        with capture_outputs(self.student_projections()) as student:
            self.model(features)
        return self.compute_loss_from_projections(
            {name: outputs[0] for name, outputs in student.items()},
            self.teacher_projection_outputs(features),
            features,
        )

    @torch.no_grad()
    def teacher_projection_outputs(self, features: dict[str, Any]) -> dict[str, Tensor]:
        """Run the teacher on the student's inputs and return its Q/K/V projection outputs."""
        self.teacher.eval()
        with capture_outputs(self.teacher_projections()) as teacher:
            self.teacher({key: value for key, value in features.items() if key != "sentence_embedding"})
        return {name: outputs[0] for name, outputs in teacher.items()}

    def compute_loss_from_projections(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], features: dict[str, Any]
    ) -> Tensor:
        """Mean over the chosen relations of the relation KL, from captured ``[B, L, D]`` projection outputs."""
        attention_mask = features["attention_mask"]
        losses = [relation_kl(student[r], teacher[r], self.relation_heads, attention_mask) for r in self.relations]
        return torch.stack(losses).mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "teacher_layer": self.teacher_layer,
            "student_layer": self.student_layer,
            "relation_heads": self.relation_heads,
            "relations": self.relations,
        }

    @property
    def citation(self) -> str:
        return BITEMBED_CITATION
