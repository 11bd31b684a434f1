"""KL divergence between the teacher's and the student's similarity distributions over in-batch candidates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from torch import Tensor, nn

from st_bitembed.losses.info_nce import BITEMBED_CITATION
from st_bitembed.losses.teacher import freeze, same_tokenizer, teacher_inputs
from st_bitembed.losses.term import TermNeeds
from st_bitembed.precisions import KL_DEFAULT_PRECISIONS


def similarity_log_distribution(embeddings: list[Tensor], temperature: float) -> Tensor:
    """Log-softmax, per query (first column), of cosine similarities to every document in the batch."""
    queries = F.normalize(embeddings[0], dim=-1)
    documents = F.normalize(torch.cat(embeddings[1:]), dim=-1)
    return F.log_softmax(queries @ documents.T / temperature, dim=-1)


class SimilarityKLLoss(nn.Module):
    """KL(teacher || student) between similarity distributions over the in-batch candidates.

    For each query (first column), the teacher's softmax over its cosine similarities to every document of the batch
    (all positives and hard negatives, i.e. every further column) is the target for the student's; separate
    temperatures sharpen or soften each side. The teacher is a frozen full-precision SentenceTransformer of any
    architecture and tokenizer, run inside the loss (a different tokenizer re-tokenizes the decoded texts), or its
    embeddings are precomputed into the dataset's ``label`` column, which is far cheaper for large teachers.

    The teacher is stored as ``self.teacher`` (never ``model``, which the trainer replaces by the wrapped student),
    frozen, so the trainer's optimizer never sees its parameters.

    Args:
        model: The student.
        teacher: Frozen teacher run inside the loss, or None to read teacher embeddings from the labels.
        student_temperature: Temperature of the student's softmax.
        teacher_temperature: Temperature of the teacher's softmax.

    References:
        - BitNet Text Embeddings: https://arxiv.org/abs/2606.25674
        - Distilling the Knowledge in a Neural Network: https://arxiv.org/abs/1503.02531

    Inputs:
        +-----------------------------------------------+---------------------------------------------------------+
        | Texts                                         | Labels                                                  |
        +===============================================+=========================================================+
        | (query, positive, [negatives...]), teacher=   | none                                                    |
        +-----------------------------------------------+---------------------------------------------------------+
        | (query, positive, [negatives...])             | teacher embeddings ``(batch, n_columns, teacher_dim)``  |
        +-----------------------------------------------+---------------------------------------------------------+

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from st_bitembed import BitEmbed
            from st_bitembed.losses import SimilarityKLLoss

            teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            model = BitEmbed.from_backbone("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({
                "anchor": ["It's nice weather outside today.", "He drove to work."],
                "positive": ["It's so sunny.", "He took the car to the office."],
            })
            loss = SimilarityKLLoss(model, teacher=teacher)
            SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
    """

    needs: ClassVar[TermNeeds] = TermNeeds(pairs=True, teacher=True)

    @staticmethod
    def describe(options: Mapping[str, Any], teacher: str | None) -> str:
        precisions = tuple(options.get("kl_precisions", KL_DEFAULT_PRECISIONS))
        at = "" if precisions == KL_DEFAULT_PRECISIONS else f" at {'/'.join(precisions)}"
        return f"similarity-distribution KL from {teacher}{at}"

    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer | None = None,
        student_temperature: float = 0.05,
        teacher_temperature: float = 0.05,
    ) -> None:
        super().__init__()
        for name, value in (
            ("student_temperature", student_temperature),
            ("teacher_temperature", teacher_temperature),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        self.model = model
        self.teacher = freeze(teacher) if teacher is not None else None
        self.shares_tokenizer = teacher is not None and same_tokenizer(model.tokenizer, teacher.tokenizer)
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        sentence_features = list(sentence_features)
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, self.teacher_embeddings(sentence_features, labels))

    @torch.no_grad()
    def teacher_embeddings(self, sentence_features: list[dict[str, Any]], labels: Tensor | None) -> list[Tensor]:
        """One teacher embedding tensor per text column: precomputed ones from the labels when the dataset has
        them (cheapest), else from the in-loss teacher."""
        if labels is not None and labels.dim() == 3 and labels.shape[1] == len(sentence_features):
            return list(labels.float().unbind(1))
        if self.teacher is None:
            raise ValueError(
                "SimilarityKLLoss without a teacher needs precomputed teacher embeddings as the 'label' column, "
                f"shaped (batch_size, {len(sentence_features)} text columns, teacher_dim); got "
                f"{None if labels is None else tuple(labels.shape)}. Pass teacher= to run the teacher in the loss."
            )
        self.teacher.eval()
        inputs = [teacher_inputs(self.model, self.teacher, f, self.shares_tokenizer) for f in sentence_features]
        return [self.teacher(features)["sentence_embedding"] for features in inputs]

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], teacher_embeddings: list[Tensor]) -> Tensor:
        """KL(teacher || student), averaged over queries."""
        if len(embeddings) < 2:
            raise ValueError(
                f"SimilarityKLLoss needs a query column and at least one document column, got {len(embeddings)}."
            )
        student = similarity_log_distribution(embeddings, self.student_temperature)
        teacher = similarity_log_distribution(
            [t.to(student.device) for t in teacher_embeddings], self.teacher_temperature
        )
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "teacher": None if self.teacher is None else type(self.teacher).__name__,
            "student_temperature": self.student_temperature,
            "teacher_temperature": self.teacher_temperature,
        }

    @property
    def citation(self) -> str:
        return BITEMBED_CITATION
