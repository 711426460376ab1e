"""The Hugging Face Trainer on the ds engine: a tiny GPT-2 built from a config trains, evaluates, saves and
resumes on 2 gloo ranks at ZeRO 2 and 3, with the same losses as the plain ds loop at ZeRO 2."""

import json
import os

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

import ds_core  # noqa: E402
from ds_core.integrations.transformers import Trainer  # noqa: E402
from ds_core.testing.models import synthetic_tokens  # noqa: E402

VOCAB, SEQ, LR, STEPS = 32, 8, 1e-2, 4


class Tokens(Dataset):
    """16 fixed sequences as ``{"input_ids", "labels"}`` (GPT-2 shifts the labels itself)."""

    def __init__(self, n=16, offset=0):
        self.x = [synthetic_tokens(1, SEQ, VOCAB, offset + i)[0][0] for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _args(out, **over):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=STEPS,
                learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, seed=0,
                train_sampling_strategy="sequential", disable_tqdm=True, dataloader_num_workers=0,
                optim="adamw_torch")
    base.update(over)
    return TrainingArguments(**base)


DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "gradient_clipping": "auto"}


class RecordingTrainer(Trainer):
    """Records this rank's loss of each training micro-batch, unrounded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank_losses = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            self.rank_losses.append(loss.item())
        return loss


def _train_losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _plain_ds_losses(stage, accumulation=1):
    """The reference: the same model, data order (the Trainer's loader shards batches round-robin over
    ranks, epoch after epoch), optimizer, accumulation and clipping through the plain ds loop; the loss
    of each micro-batch."""
    model = _model()
    engine, *_ = ds_core.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR,
                                                                             weight_decay=0.0),
                                    config={"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
                                            "gradient_accumulation_steps": accumulation,
                                            "steps_per_print": 0, "zero_optimization": {"stage": stage}})
    batches = list(DataLoader(Tokens(), batch_size=2))[dist.get_rank()::2] * 2  # two epochs
    losses = []
    for batch in batches[:STEPS * accumulation]:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.world_size(2, timeout=300)
def test_trainer_zero2_trains_evaluates_saves_and_resumes_with_plain_loop_parity(tmp_path):
    config = {**DS_CONFIG, "zero_optimization": {"stage": 2}}
    args = _args(tmp_path / "run", gradient_accumulation_steps=2)  # the Trainer's boundaries drive the engine
    trainer = RecordingTrainer(model=_model(), args=args, train_dataset=Tokens(),
                               eval_dataset=Tokens(4, offset=100), ds_config=config)
    trainer.train()
    assert trainer.engine.global_steps == STEPS and trainer.engine.config["zero_optimization"]["stage"] == 2
    assert trainer.engine.gradient_accumulation_steps() == 2  # "auto" from the TrainingArguments
    assert len(_train_losses(trainer)) == STEPS  # the Trainer logged every step
    # this rank's loss at each micro-step equals the plain ds loop's (same seed, data, optimizer,
    # accumulation, clipping): 1e-5
    reference = _plain_ds_losses(stage=2, accumulation=2)
    assert len(trainer.rank_losses) == 2 * STEPS
    assert max(abs(a - b) for a, b in zip(trainer.rank_losses, reference)) < 1e-5, (trainer.rank_losses, reference)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))

    # checkpoint-2 holds save_pretrained files and the engine checkpoint
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "latest").read_text().strip() == "global_step2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2

    # resume from step 2 in a fresh Trainer: the same weights after step 4
    again = Trainer(model=_model(), args=args, train_dataset=Tokens(), ds_config=config)
    again.train(resume_from_checkpoint=str(ckpt))
    assert again.state.global_step == STEPS and again.engine.global_steps == STEPS
    for (name, a), b in zip(again.model.named_parameters(), trainer.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    final = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    assert torch.equal(final["transformer.wte.weight"], trainer.model.transformer.wte.weight.detach())


@pytest.mark.world_size(2, timeout=300)
def test_trainer_zero3_trains_evaluates_saves_and_resumes(tmp_path):
    config = {**DS_CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    trainer = RecordingTrainer(model=_model(), args=_args(tmp_path / "run"), train_dataset=Tokens(),
                               eval_dataset=Tokens(4, offset=100), ds_config=config)
    trainer.train()
    losses = _train_losses(trainer)
    assert len(losses) == STEPS
    reference = _plain_ds_losses(stage=3)
    assert max(abs(a - b) for a, b in zip(trainer.rank_losses, reference)) < 1e-5, (trainer.rank_losses, reference)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    trainer.save_model(str(tmp_path / "final"))  # every rank joins the gather
    dist.barrier()
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert saved["transformer.wte.weight"].shape == (VOCAB, 16) and torch.isfinite(saved["transformer.wte.weight"]).all()
    reloaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    x = Tokens(1, offset=100)[0]["input_ids"][None]
    with torch.no_grad():
        direct = reloaded(input_ids=x, labels=x).loss.item()
    assert abs(direct - metrics["eval_loss"]) < 1.0  # the saved weights are the trained ones, not a placeholder

    again = Trainer(model=_model(), args=_args(tmp_path / "run"), train_dataset=Tokens(), ds_config=config)
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert again.state.global_step == STEPS and again.engine.global_steps == STEPS
    assert os.path.isdir(tmp_path / "run" / "checkpoint-4" / "global_step4")
    resumed = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")["transformer.wte.weight"]
    resumed_losses = _train_losses(again)  # steps 1-2 from the checkpoint's log history, 3-4 trained again
    assert len(resumed_losses) == STEPS and max(abs(a - b) for a, b in zip(resumed_losses, losses)) < 1e-5
    assert torch.allclose(resumed, saved["transformer.wte.weight"], atol=1e-6)
