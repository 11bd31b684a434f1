from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import TrainerCallback

from st_bitembed.losses import BitEmbedLoss

PAIRS = {
    "anchor": [f"Question number {i}: what is item {i} about?" for i in range(24)],
    "positive": [f"Item {i} is about topic {i % 7} and detail {i}." for i in range(24)],
}


class StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def train(model, teacher, output_dir: Path, max_steps: int, resume_from: str | None = None):
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=6,
        learning_rate=2e-3,
        logging_steps=1,
        save_steps=3,
        save_total_limit=None,
        report_to="none",
        seed=0,
        use_cpu=True,
        dataloader_drop_last=True,
    )
    loss = BitEmbedLoss(model, teacher=teacher, similarity_kl=1.0, attention_relation=1.0)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(PAIRS), loss=loss, callbacks=[StepRecorder()]
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, loss


def batch_loss(model, loss) -> float:
    features = [model.preprocess(PAIRS["anchor"][:12]), model.preprocess(PAIRS["positive"][:12])]
    with torch.no_grad():
        return torch.stack(list(loss(features, None).values())).sum().item()


def test_trainer_lowers_loss_logs_terms_checkpoints_and_resumes(converted_qwen3, qwen3_teacher, tmp_path):
    initial = copy.deepcopy(converted_qwen3)
    before = batch_loss(
        converted_qwen3,
        BitEmbedLoss(converted_qwen3, teacher=qwen3_teacher, similarity_kl=1.0, attention_relation=1.0),
    )
    trainer, loss = train(converted_qwen3, qwen3_teacher, tmp_path / "run", max_steps=6)
    assert batch_loss(converted_qwen3, loss) < before

    logged = set().union(*[entry.keys() for entry in trainer.state.log_history])
    for term in ("infonce/float32", "infonce/int4", "infonce/binary", "similarity_kl", "attention_relation"):
        assert term in logged, term
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in qwen3_teacher.parameters()}
    assert {id(p) for p in converted_qwen3.quantizer.parameters()} <= optimized

    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "modules.json").exists() and (checkpoint / "quantize" / "model.safetensors").exists()
    resumed_model = initial
    resumed, _ = train(resumed_model, qwen3_teacher, tmp_path / "run", max_steps=6, resume_from=str(checkpoint))
    assert resumed.state.global_step == 6
    recorder = next(c for c in resumed.callback_handler.callbacks if isinstance(c, StepRecorder))
    assert recorder.steps == [4, 5, 6]  # really resumed, not restarted
    final, reference = resumed_model.state_dict(), converted_qwen3.state_dict()
    assert final.keys() == reference.keys()
    for key in final:  # the resumed run ends where the uninterrupted one did, Quantize head included
        torch.testing.assert_close(final[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)


DDP_SCRIPT = Path(__file__).with_name("ddp_train.py")


def test_two_process_ddp_training_gathers_in_batch_negatives(qwen3_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(DDP_SCRIPT),
        str(qwen3_dir),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["steps"] == 3
        # each query is scored against the positives of both processes: 2 x the per-device batch
        assert set(report["candidates_per_query"]) == {2 * report["per_device_batch_size"]}
    # the Quantize head's gradients were averaged, so both processes end with the same head
    assert reports[0]["head"] == pytest.approx(reports[1]["head"], abs=1e-7)
    assert (tmp_path / "out" / "checkpoint-3" / "quantize" / "model.safetensors").exists()
