"""The BitEmbed training objective: multi-precision InfoNCE + similarity-KL + attention-relation distillation
(+ embedding and token-level hidden-state distillation)."""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, ClassVar

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import column_merging_disabled, embed_columns
from torch import Tensor, nn

from st_bitembed.losses.attention_relation import AttentionRelationLoss, capture_outputs
from st_bitembed.losses.embedding_distill import EmbeddingDistillLoss
from st_bitembed.losses.hidden_state import HiddenStateDistillLoss
from st_bitembed.losses.info_nce import BITEMBED_CITATION, InfoNCELoss
from st_bitembed.losses.multi_precision import MultiPrecisionLoss
from st_bitembed.losses.similarity_kl import SimilarityKLLoss
from st_bitembed.losses.term import LossTerm, TermNeeds
from st_bitembed.precisions import DEFAULT_PRECISIONS, KL_DEFAULT_PRECISIONS, PrecisionName

# Merged columns are padded to the longest column: with short queries beside long passages, most merged tokens would
# be padding, which costs real compute on CPU (and memory anywhere).
MERGE_PADDING_LIMIT = 1.25


def mergeable(sentence_features: list[dict[str, Tensor]]) -> bool:
    """Whether running the text columns (after the anchor) as one padded batch costs at most
    :data:`MERGE_PADDING_LIMIT` times the tokens of running them one by one."""
    widths = [features["input_ids"].shape[-1] for features in sentence_features[1:] if "input_ids" in features]
    return len(widths) < 2 or max(widths) * len(widths) <= MERGE_PADDING_LIMIT * sum(widths)


class BitEmbedLoss(nn.Module):
    """``infonce * MultiPrecision(InfoNCE) + similarity_kl * SimilarityKL + attention_relation * AttentionRelation
    + embedding_distill * EmbeddingDistill + hidden_states * HiddenStateDistill``, from one student forward.

    Each weight turns its term on (> 0) or off (0); by default only the multi-precision InfoNCE is on, the
    paper's stage 1 (continual contrastive pre-training); stage 2 adds ``similarity_kl`` and
    ``attention_relation``. Returns a dict of terms (``infonce/<precision>`` and the other weights' names), which
    SentenceTransformerTrainer sums for the backward pass and logs one by one. A non-finite term stops training with
    an error that names it. What each term needs (pairs of texts, a teacher, the student's tokenizer) is declared
    by its class (:data:`TERMS`, :meth:`needs`).

    Args:
        model: A :class:`~st_bitembed.BitEmbed` student.
        teacher: Frozen full-precision teacher, run inside the loss. Any tokenizer for the KL and embedding terms;
            the attention-relation and hidden-state terms need the student's tokenizer. None: the KL and embedding
            terms read precomputed teacher embeddings from the labels.
        infonce: Weight of the multi-precision InfoNCE terms (0: distillation only, which also trains on a single
            column of unlabeled texts).
        similarity_kl: Weight of the similarity-distribution KL term (:class:`SimilarityKLLoss`).
        attention_relation: Weight of the attention-relation term (:class:`AttentionRelationLoss`; needs
            ``teacher``).
        embedding_distill: Weight of direct embedding distillation, ``1 - cos(student, teacher)`` per text
            (:class:`EmbeddingDistillLoss`; needs equal embedding dimensions).
        hidden_states: Weight of token-level hidden-state distillation (:class:`HiddenStateDistillLoss`; needs
            ``teacher`` with the student's tokenizer and hidden size); ``hidden_state_layers`` its student blocks
            (all by default).
        token_teacher: The model the token-level terms (attention relations, hidden states) learn from, when it is
            not ``teacher``: for a teacher with another tokenizer or hidden size, e.g. the backbone's own
            full-precision model beside all-MiniLM-L6-v2's precomputed embeddings. None: ``teacher``.
        precisions: Storage precisions InfoNCE is applied at; ``precision_weights`` their weights.
        kl_precisions: Storage precisions the similarity KL is applied at (the Quantize head's straight-through
            outputs, as InfoNCE's): by default the float output alone; with coarse precisions (``int2``,
            ``binary``) the student learns to keep the teacher's ranking once its embeddings are stored that way,
            and the head's ranges are trained, without any contrastive labels.
        temperature: InfoNCE temperature; ``symmetric`` adds its document-to-query term;
            ``gather_across_devices`` shares in-batch negatives across DDP processes.
        student_temperature, teacher_temperature: Temperatures of the KL term.
        teacher_layer, student_layer, relation_heads: Of the attention-relation term.
        renamed_weights: ``alpha`` / ``beta`` / ``gamma``, the names of ``similarity_kl`` / ``attention_relation``
            / ``embedding_distill`` before 0.2: still accepted, with a FutureWarning.

    References:
        - BitNet Text Embeddings: https://arxiv.org/abs/2606.25674
        - MiniLMv2: https://arxiv.org/abs/2012.15828

    Inputs:
        +-----------------------------------------------+-------------------------------------------------------+
        | Texts                                         | Labels                                                |
        +===============================================+=======================================================+
        | (query, positive, [negatives...])             | none, or teacher embeddings (batch, columns, dim)     |
        +-----------------------------------------------+-------------------------------------------------------+
        | (text,) with ``infonce=0`` and no KL          | none                                                  |
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
            loss = BitEmbedLoss(model, teacher=teacher, similarity_kl=1.0, attention_relation=1.0)
            SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
    """

    # Each weight's keyword and the term it weighs.
    TERMS: ClassVar[dict[str, type[LossTerm]]] = {
        "infonce": InfoNCELoss,
        "similarity_kl": SimilarityKLLoss,
        "attention_relation": AttentionRelationLoss,
        "embedding_distill": EmbeddingDistillLoss,
        "hidden_states": HiddenStateDistillLoss,
    }

    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer | None = None,
        infonce: float = 1.0,
        similarity_kl: float = 0.0,
        attention_relation: float = 0.0,
        embedding_distill: float = 0.0,
        hidden_states: float = 0.0,
        precisions: Sequence[PrecisionName] = DEFAULT_PRECISIONS,
        precision_weights: Sequence[float] | None = None,
        kl_precisions: Sequence[PrecisionName] = KL_DEFAULT_PRECISIONS,
        temperature: float = 0.05,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        student_temperature: float = 0.05,
        teacher_temperature: float = 0.05,
        teacher_layer: int = -1,
        student_layer: int = -1,
        relation_heads: int | None = None,
        hidden_state_layers: Sequence[int] | None = None,
        token_teacher: SentenceTransformer | None = None,
        **renamed_weights: float,
    ) -> None:
        super().__init__()
        weights = {
            "infonce": infonce,
            "similarity_kl": similarity_kl,
            "attention_relation": attention_relation,
            "embedding_distill": embedding_distill,
            "hidden_states": hidden_states,
        }
        weights.update(renamed(renamed_weights, "BitEmbedLoss"))
        if min(weights.values()) < 0 or max(weights.values()) == 0:
            raise ValueError(f"Loss weights must be >= 0 and at least one > 0, got {weights}.")
        unused = self.unused_kl_precisions(weights, kl_precisions)
        if unused:
            raise ValueError(unused)
        in_loss = self.terms_that_need(weights, "teacher_in_loss")
        if token_teacher is not None and not in_loss:
            raise ValueError(
                "token_teacher= is given but no token-level term is on, so it would be unused: give "
                "hidden_states or attention_relation a weight above 0, or leave token_teacher out."
            )
        if token_teacher is None:
            token_teacher = teacher
        if in_loss and token_teacher is None:
            raise ValueError(
                f"{', '.join(in_loss)} > 0 (token-level distillation) needs teacher= (or token_teacher=), run inside "
                "the loss."
            )
        # The token teacher's passes give the pooled targets too, when it is the teacher.
        self.pooled_from_token_passes = token_teacher is teacher
        self.model = model
        self.weights = weights
        self.contrastive = (
            MultiPrecisionLoss(
                model, InfoNCELoss(model, temperature, symmetric, gather_across_devices), precisions, precision_weights
            )
            if weights["infonce"] > 0
            else None
        )
        # Also the source of teacher embeddings (labels or in-loss teacher) for the embedding-distillation term.
        self.similarity_kl = (
            SimilarityKLLoss(model, teacher, student_temperature, teacher_temperature)
            if weights["similarity_kl"] > 0 or weights["embedding_distill"] > 0
            else None
        )
        # At the float output alone the KL is its plain term; at several precisions, one term per precision.
        self.kl_at_precisions = (
            MultiPrecisionLoss(model, self.similarity_kl, kl_precisions)
            if weights["similarity_kl"] > 0 and tuple(kl_precisions) != KL_DEFAULT_PRECISIONS
            else None
        )
        self.embedding_distill = (
            EmbeddingDistillLoss(model, distance_metric="cosine") if weights["embedding_distill"] > 0 else None
        )
        self.attention_relation = (
            AttentionRelationLoss(model, token_teacher, teacher_layer, student_layer, relation_heads)
            if weights["attention_relation"] > 0
            else None
        )
        self.hidden_state_distill = (
            HiddenStateDistillLoss(model, token_teacher, hidden_state_layers) if weights["hidden_states"] > 0 else None
        )

    @staticmethod
    def unused_kl_precisions(weights: Mapping[str, float], kl_precisions: Sequence[str]) -> str | None:
        """Why ``kl_precisions`` would do nothing with these weights (the KL is off), or ``None``."""
        if tuple(kl_precisions) != KL_DEFAULT_PRECISIONS and weights.get("similarity_kl", 0) == 0:
            return (
                "kl_precisions given while similarity_kl is 0: the KL they apply to is off, so they would do nothing; "
                "give similarity_kl a weight above 0, or leave kl_precisions out."
            )
        return None

    @classmethod
    def active_terms(cls, weights: Mapping[str, float]) -> list[str]:
        """The weights' names whose terms are on (weight > 0), in :data:`TERMS` order."""
        return [name for name in cls.TERMS if weights.get(name, 0) > 0]

    @classmethod
    def terms_that_need(cls, weights: Mapping[str, float], requirement: str) -> list[str]:
        """The active terms that have ``requirement`` (a :class:`TermNeeds` field), e.g. ``"same_tokenizer"``."""
        return [name for name in cls.active_terms(weights) if getattr(cls.TERMS[name].needs, requirement)]

    @classmethod
    def pooled_terms(cls, weights: Mapping[str, float]) -> list[str]:
        """The active terms that need the teacher's sentence embeddings and not the teacher itself: they can read
        embeddings encoded before training, from a teacher of any tokenizer."""
        return [name for name in cls.terms_that_need(weights, "teacher") if not cls.TERMS[name].needs.teacher_in_loss]

    @classmethod
    def needs(cls, weights: Mapping[str, float]) -> TermNeeds:
        """What the terms switched on by ``weights`` need together."""
        return functools.reduce(operator.or_, (cls.TERMS[n].needs for n in cls.active_terms(weights)), TermNeeds())

    @classmethod
    def describe(cls, options: Mapping[str, Any], teacher: str | None, token_teacher: str | None = None) -> list[str]:
        """One line per active term (``options``: this class's keyword arguments), for the model card; token-level
        terms name ``token_teacher`` when given."""
        lines = []
        for name in cls.active_terms(options):
            weight = "" if options[name] == 1 else f"{options[name]} x "
            source = (token_teacher or teacher) if cls.TERMS[name].needs.teacher_in_loss else teacher
            lines.append(weight + cls.TERMS[name].describe(options, source))
        return lines

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
            terms.update({f"infonce/{p}": self.weights["infonce"] * t for p, t in contrastive.items()})

        # When another term runs the same teacher on the same inputs, its anchor pass also yields the relations.
        shared_teacher = relation is not None and any(
            term is not None and term.teacher is relation.teacher for term in (self.similarity_kl, hidden)
        )
        with capture_outputs(relation.teacher_projections() if shared_teacher else {}) as teacher_projections:
            teacher_embeddings = None
            if hidden is not None:  # the first student forward, and so the first teacher pass, is the anchor column
                distance, rows = hidden.compute_loss_from_forwards(student_forwards)
                terms["hidden_states"] = self.weights["hidden_states"] * distance
                if labels is None and self.pooled_from_token_passes:  # the same passes give the pooled targets
                    teacher_embeddings = list(rows.split([len(e) for e in embeddings]))
            if self.similarity_kl is not None:
                if teacher_embeddings is None:
                    teacher_embeddings = self.similarity_kl.teacher_embeddings(sentence_features, labels)
                weight = self.weights["similarity_kl"]
                if self.kl_at_precisions is not None:
                    kl_terms = self.kl_at_precisions.compute_terms(embeddings, teacher_embeddings)
                    terms.update({f"similarity_kl/{p}": weight * t for p, t in kl_terms.items()})
                elif weight > 0:
                    kl = self.similarity_kl.compute_loss_from_embeddings(embeddings, teacher_embeddings)
                    terms["similarity_kl"] = weight * kl
                if self.embedding_distill is not None:
                    distill = self.embedding_distill.compute_loss_from_embeddings(embeddings, teacher_embeddings)
                    terms["embedding_distill"] = self.weights["embedding_distill"] * distill
        if relation is not None:
            anchor = sentence_features[0]
            teacher_outputs = {name: outputs[0] for name, outputs in teacher_projections.items() if outputs}
            if len(teacher_outputs) != len(relation.relations):  # the KL term read precomputed labels instead
                teacher_outputs = relation.teacher_projection_outputs(anchor)
            student_outputs = {name: outputs[0] for name, outputs in student_projections.items()}
            terms["attention_relation"] = self.weights["attention_relation"] * relation.compute_loss_from_projections(
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
        terms = {
            "infonce": self.contrastive,
            "similarity_kl": self.kl_at_precisions or self.similarity_kl,
            "attention_relation": self.attention_relation,
            "hidden_states": self.hidden_state_distill,
        }
        return {
            "weights": dict(self.weights),
            "terms": {name: term.get_config_dict() for name, term in terms.items() if term is not None},
        }

    @property
    def citation(self) -> str:
        return BITEMBED_CITATION


# Weight keywords before 0.2 and their names since; accepted (with a warning) in code and in recipes for one release.
RENAMED_WEIGHTS = {"alpha": "similarity_kl", "beta": "attention_relation", "gamma": "embedding_distill"}


def renamed(weights: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``weights`` given under their names before 0.2 (``alpha``, ``beta``, ``gamma``), under today's names.

    Raises:
        TypeError: a keyword that is neither a weight's old name nor one of today's.
    """
    unknown = sorted(set(weights) - set(RENAMED_WEIGHTS))
    if unknown:
        raise TypeError(f"{where}: unknown keyword(s) {unknown}; the weights are {list(BitEmbedLoss.TERMS)}.")
    for old, new in RENAMED_WEIGHTS.items():
        if old in weights:
            warnings.warn(
                f"{where}: {old!r} is now called {new!r} (it says what it weighs); {old!r} will stop working in 0.3.",
                FutureWarning,
                stacklevel=3,
            )
    return {RENAMED_WEIGHTS[old]: value for old, value in weights.items()}
