"""Run by test_bitembed_trainer.py under `torch.distributed.run --nproc_per_node 2`: a CPU (gloo) DDP training run."""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.util import cos_sim

from st_bitembed import BitEmbed
from st_bitembed.losses import BitEmbedLoss


def main() -> None:
    backbone_dir, output_dir = sys.argv[1], sys.argv[2]
    model = BitEmbed.from_backbone(backbone_dir)
    candidates: list[int] = []

    def recording_similarity(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        candidates.append(documents.shape[0])
        return cos_sim(queries, documents)

    loss = BitEmbedLoss(
        model, similarity_kl=0.0, attention_relation=0.0, gather_across_devices=True, precisions=["float32", "int4"]
    )
    loss.contrastive.loss.similarity_fct = recording_similarity
    dataset = Dataset.from_dict(
        {
            "anchor": [f"query {i} about {i % 5}" for i in range(24)],
            "positive": [f"doc {i} on {i % 5}" for i in range(24)],
        }
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(output_dir, "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_steps=3,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        logging_steps=1,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()
    report = {
        "world_size": torch.distributed.get_world_size(),
        "steps": trainer.state.global_step,
        "per_device_batch_size": 4,
        "candidates_per_query": sorted(set(candidates)),
        "head": model.quantizer.log_half_ranges["int4"].tolist(),
    }
    with open(os.path.join(output_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main()
