"""Lightning's strategy: a LightningModule trains under the ds engine on 2 gloo ranks, with the progress
bar, a logger, ModelCheckpoint and resume, and the same losses as the plain ds loop."""

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

import ds_core  # noqa: E402
from ds_core.integrations.lightning import DSStrategy  # noqa: E402
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens  # noqa: E402

CFG = GPTConfig(vocab_size=32, seq_len=8, dim=16, layers=1, heads=2)
LR = 1e-2
STEPS = 4  # two epochs of two steps: 2 ranks x 2 samples x 2 steps per epoch


def _loader():
    """Each rank's share of the data in a fixed order, the same for Lightning and the plain loop."""
    data = _dataset()
    return DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False, num_replicas=2,
                                                                     rank=dist.get_rank()))


def _dataset():
    xs, ys = zip(*(synthetic_tokens(1, CFG.seq_len, CFG.vocab_size, i) for i in range(2 * 2 * 2)))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


class TinyGPT(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(CFG)
        self.losses = []

    def forward(self, x, y):
        return self.gpt(x, y)

    def training_step(self, batch, batch_idx):
        loss = self(*batch)
        self.losses.append(loss.item())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(*batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def train_dataloader(self):
        return _loader()

    def val_dataloader(self):
        return DataLoader(_dataset(), batch_size=2, shuffle=False)


def _trainer(tmp_path, strategy, max_steps=STEPS, **kw):
    return Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps,
                   logger=CSVLogger(tmp_path / "logs", name="run"), enable_progress_bar=True,
                   callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)],  # each epoch
                   num_sanity_val_steps=0, limit_val_batches=2, log_every_n_steps=1,
                   enable_model_summary=False, use_distributed_sampler=False, **kw)


def _plain_ds_losses(stage, steps=STEPS):
    """The reference: the same model, data order and optimizer through the plain ds loop."""
    torch.manual_seed(0)
    model = GPT(CFG)
    engine, *_ = ds_core.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                    config={"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
                                            "zero_optimization": {"stage": stage}})
    losses = []
    for x, y in [*_loader(), *_loader()][:steps]:  # two epochs
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_strategies_are_registered_by_name():
    for name in ("ds_stage_1", "ds_stage_2", "ds_stage_3", "ds_stage_3_offload"):
        assert name in StrategyRegistry
    offload = StrategyRegistry.get("ds_stage_3_offload")
    assert isinstance(offload, DSStrategy)
    zero = offload.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert StrategyRegistry.get("ds_stage_2").config["zero_optimization"]["stage"] == 2
    custom = DSStrategy(config={"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}, stage=2)
    assert custom.config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}


@pytest.mark.world_size(2, timeout=300)
def test_lightning_trains_checkpoints_and_resumes_with_plain_loop_parity(tmp_path):
    tmp_path = tmp_path  # the same directory on both ranks (resolved once in the pytest process)
    model = TinyGPT()
    trainer = _trainer(tmp_path, "ds_stage_2")
    trainer.fit(model)
    engine = trainer.strategy.engine
    assert engine.global_steps == STEPS and engine.config["zero_optimization"]["stage"] == 2
    # validate() after fit runs through the engine: the weights the last validation of fit saw
    last_val = float(trainer.callback_metrics["val_loss"])
    assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(last_val, abs=1e-6)

    # parity with the plain ds loop at ZeRO 2 (same seed, data order, optimizer): 1e-5
    reference = _plain_ds_losses(stage=2)
    assert len(model.losses) == STEPS
    assert max(abs(a - b) for a, b in zip(model.losses, reference)) < 1e-5, (model.losses, reference)

    # ModelCheckpoint wrote engine checkpoint directories; the logger got the losses
    first, last = tmp_path / "ckpt" / "epoch=0-step=2.ckpt", tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    assert (first / "latest").read_text().strip() == "checkpoint" and (last / "checkpoint" / "meta.json").is_file()
    dist.barrier()
    if dist.get_rank() == 0:
        metrics = (tmp_path / "logs" / "run" / "version_0" / "metrics.csv").read_text()
        assert "train_loss" in metrics and "val_loss" in metrics

    # resume from the end of epoch 0: epoch 1 repeats the uninterrupted run's losses
    resumed = TinyGPT()
    trainer2 = _trainer(tmp_path / "again", DSStrategy(stage=2))
    trainer2.fit(resumed, ckpt_path=str(first))
    assert trainer2.global_step == STEPS and trainer2.strategy.engine.global_steps == STEPS
    assert len(resumed.losses) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(resumed.losses, model.losses[2:])) < 1e-6, (resumed.losses, model.losses)
    for a, b in zip(trainer2.strategy.engine.module.parameters(), engine.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    cb = trainer2.checkpoint_callback
    assert cb.best_model_path.endswith(".ckpt")  # ModelCheckpoint's state came back through client_state


@pytest.mark.world_size(2, timeout=300)
def test_lightning_zero3_trains_and_validates_with_plain_loop_parity(tmp_path):
    model = TinyGPT()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ds_stage_3", max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                      limit_val_batches=2, use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(model)
    assert trainer.strategy.engine.config["zero_optimization"]["stage"] == 3
    reference = _plain_ds_losses(stage=3, steps=2)
    assert max(abs(a - b) for a, b in zip(model.losses, reference)) < 1e-5, (model.losses, reference)
    assert torch.isfinite(torch.tensor(trainer.validate(model, verbose=False)[0]["val_loss"]))
