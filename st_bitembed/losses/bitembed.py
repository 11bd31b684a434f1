"""The BitEmbed training objective: multi-precision InfoNCE + similarity-KL + attention-relation distillation
(+ embedding and token-level hidden-state distillation)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import column_merging_disabled, embed_columns
from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss
from torch import Tensor, nn

from st_bitembed.losses.attention_relation import AttentionRelationLoss, capture_outputs
from st_bitembed.losses.hidden_state import HiddenStateDistillLoss
from st_bitembed.losses.info_nce import BITEMBED_CITATION, InfoNCELoss
from st_bitembed.losses.multi_precision import MultiPrecisionLoss
from st_bitembed.losses.similarity_kl import SimilarityKLLoss
from st_bitembed.precisions import DEFAULT_PRECISIONS, PrecisionName

# Merged columns are padded to the longest column: with short queries beside long passages, most merged tokens would
# be padding, which costs real compute on CPU (and memory anywhere).
MERGE_PADDING_LIMIT = 1.25


def mergeable(sentence_features: list[dict[str, Tensor]]) -> bool:
    """Whether running the text columns (after the anchor) as one padded batch costs at most
    :data:`MERGE_PADDING_LIMIT` times the tokens of running them one by one."""
    widths = [features["input_ids"].shape[-1] for features in sentence_features[1:] if "input_ids" in features]
    return len(widths) < 2 or max(widths) * len(widths) <= MERGE_PADDING_LIMIT * sum(widths)


class BitEmbedLoss(nn.Module):
    """``infonce * MultiPrecision(InfoNCE) + alpha * SimilarityKL + beta * AttentionRelation
    [+ gamma * EmbeddingDistill + hidden_states * HiddenStateDistill]``, from one student forward.

    Returns a dict of terms (``infonce/<precision>``, ``similarity_kl``, ``attention_relation``,
    ``embedding_distill``, ``hidden_states``), which
    SentenceTransformerTrainer sums for the backward pass and logs one by one. Stage 1 (continual contrastive
    pre-training) is ``alpha=0, beta=0`` (or ``alpha > 0`` with a teacher); stage 2 adds both distillation terms.
    A non-finite term stops training with an error that names it.

    Args:
        model: A :class:`~st_bitembed.BitEmbed` student.
        teacher: Frozen full-precision teacher, run inside the loss. Any tokenizer for the KL term; the attention
            term needs the student's tokenizer. None: KL reads precomputed teacher embeddings from the labels.
        alpha: Weight of the similarity-distribution KL term (0 turns it off).
        beta: Weight of the attention-relation term (0 turns it off; needs ``teacher``).
        gamma: Weight of direct embedding distillation, ``1 - cos(student, teacher)`` per text (sentence-transformers'
            EmbedDistillLoss; needs equal embedding dimensions). Not in the paper's objective; off by default. It
            speeds up recovery a lot when the teacher is the backbone's own full-precision model.
        infonce: Weight of the multi-precision InfoNCE terms (0 turns contrastive learning off: distillation only,
            which also trains on a single column of unlabeled texts).
        hidden_states: Weight of token-level hidden-state distillation (:class:`HiddenStateDistillLoss`; needs
            ``teacher`` with the student's tokenizer and hidden size); ``hidden_state_layers`` its student blocks
            (all by default).
        precisions: Storage precisions InfoNCE is applied at; ``precision_weights`` their weights.
        temperature: InfoNCE temperature; ``symmetric`` adds its document-to-query term;
            ``gather_across_devices`` shares in-batch negatives across DDP processes.
        student_temperature, teacher_temperature: Temperatures of the KL term.
        teacher_layer, student_layer, relation_heads: Of the attention-relation term.

    References:
        - BitNet Text Embeddings: https://arxiv.org/abs/2606.25674
        - MiniLMv2: https://arxiv.org/abs/2012.15828

    Inputs:
        +-----------------------------------------------+-------------------------------------------------------+
        | Texts                                         | Labels                                                |
        +===============================================+=======================================================+
        | (query, positive, [negatives...])             | none, or teacher embeddings (batch, columns, dim)     |
        +-----------------------------------------------+-------------------------------------------------------+

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from st_bitembed import BitEmbed
            from st_bitembed.losses import BitEmbedLoss

            teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            model = BitEmbed.from_backbone("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({
                "anchor": ["It's nice weather outside today.", "He drove to work."],
                "positive": ["It's so sunny.", "He took the car to the office."],
            })
            loss = BitEmbedLoss(model, teacher=teacher, alpha=1.0, beta=1.0)
            SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
    """

    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer | None = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.0,
        precisions: Sequence[PrecisionName] = DEFAULT_PRECISIONS,
        precision_weights: Sequence[float] | None = None,
        temperature: float = 0.05,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        student_temperature: float = 0.05,
        teacher_temperature: float = 0.05,
        teacher_layer: int = -1,
        student_layer: int = -1,
        relation_heads: int | None = None,
        infonce: float = 1.0,
        hidden_states: float = 0.0,
        hidden_state_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        weights = {"infonce": infonce, "alpha": alpha, "beta": beta, "gamma": gamma, "hidden_states": hidden_states}
        if min(weights.values()) < 0 or max(weights.values()) == 0:
            raise ValueError(f"Loss weights must be >= 0 and at least one > 0, got {weights}.")
        for name in ("beta", "hidden_states"):
            if weights[name] > 0 and teacher is None:
                raise ValueError(f"{name} > 0 (token-level distillation) needs teacher=, a model run inside the loss.")
        self.model = model
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.infonce, self.hidden_states = infonce, hidden_states
        self.contrastive = (
            MultiPrecisionLoss(
                model, InfoNCELoss(model, temperature, symmetric, gather_across_devices), precisions, precision_weights
            )
            if infonce > 0
            else None
        )
        # Also the source of teacher embeddings (labels or in-loss teacher) for the embedding-distillation term.
        self.similarity_kl = (
            SimilarityKLLoss(model, teacher, student_temperature, teacher_temperature)
            if alpha > 0 or gamma > 0
            else None
        )
        self.embedding_distill = EmbedDistillLoss(model, distance_metric="cosine") if gamma > 0 else None
        self.attention_relation = (
            AttentionRelationLoss(model, teacher, teacher_layer, student_layer, relation_heads) if beta > 0 else None
        )
        self.hidden_state_distill = (
            HiddenStateDistillLoss(model, teacher, hidden_state_layers) if hidden_states > 0 else None
        )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        sentence_features = list(sentence_features)
        relation, hidden = self.attention_relation, self.hidden_state_distill
        with (
            capture_outputs(relation.student_projections() if relation else {}) as student_projections,
            hidden.capture_student() if hidden else nullcontext() as student_forwards,
        ):
            # embed_columns runs the anchor column first and on its own: the first captured call is the anchor.
            with nullcontext() if mergeable(sentence_features) else column_merging_disabled():
                embeddings = embed_columns(self.model, sentence_features)
        terms = {}
        if self.contrastive is not None:
            contrastive = self.contrastive.compute_terms(embeddings, labels)
            terms.update({f"infonce/{p}": self.infonce * t for p, t in contrastive.items()})

        # When another term runs the same teacher on the same inputs, its anchor pass also yields the relations.
        shared_teacher = relation is not None and any(
            term is not None and term.teacher is relation.teacher for term in (self.similarity_kl, hidden)
        )
        with capture_outputs(relation.teacher_projections() if shared_teacher else {}) as teacher_projections:
            teacher_embeddings = None
            if hidden is not None:  # the first student forward, and so the first teacher pass, is the anchor column
                distance, rows = hidden.compute_loss_from_forwards(student_forwards)
                terms["hidden_states"] = self.hidden_states * distance
                if labels is None:  # the same teacher passes give the pooled targets: no second teacher run
                    teacher_embeddings = list(rows.split([len(e) for e in embeddings]))
            if self.similarity_kl is not None:
                if teacher_embeddings is None:
                    teacher_embeddings = self.similarity_kl.teacher_embeddings(sentence_features, labels)
                if self.alpha > 0:
                    kl = self.similarity_kl.compute_loss_from_embeddings(embeddings, teacher_embeddings)
                    terms["similarity_kl"] = self.alpha * kl
                if self.embedding_distill is not None:
                    distill = self.embedding_distill.compute_loss_from_embeddings(embeddings, teacher_embeddings)
                    terms["embedding_distill"] = self.gamma * distill
        if relation is not None:
            anchor = sentence_features[0]
            teacher_outputs = {name: outputs[0] for name, outputs in teacher_projections.items() if outputs}
            if len(teacher_outputs) != len(relation.relations):  # the KL term read precomputed labels instead
                teacher_outputs = relation.teacher_projection_outputs(anchor)
            student_outputs = {name: outputs[0] for name, outputs in student_projections.items()}
            terms["attention_relation"] = self.beta * relation.compute_loss_from_projections(
                student_outputs, teacher_outputs, anchor
            )
        for name, value in terms.items():
            if not math.isfinite(value.item()):
                raise FloatingPointError(
                    f"BitEmbedLoss term {name!r} is {value.item()}: training diverged or an input is degenerate. "
                    "Lower the learning rate, raise the temperatures, or check the batch (empty or duplicate texts)."
                )
        return terms

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "infonce": self.infonce,
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "hidden_states": self.hidden_states,
            "contrastive": self.contrastive.get_config_dict() if self.contrastive else None,
            "hidden_state_distill": self.hidden_state_distill.get_config_dict() if self.hidden_state_distill else None,
            "similarity_kl": self.similarity_kl.get_config_dict() if self.similarity_kl else None,
            "attention_relation": self.attention_relation.get_config_dict() if self.attention_relation else None,
        }

    @property
    def citation(self) -> str:
        return BITEMBED_CITATION
