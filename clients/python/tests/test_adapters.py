"""The Lightning callback, the Hugging Face TrainerCallback and the Kafka
transport, each driving a few real training steps into a real service."""

from __future__ import annotations

import math

import torch
from problems import Regression

import gradguard


def test_lightning_callback_streams_every_optimizer_step(server, tmp_path):
    import lightning.pytorch as pl

    from gradguard.lightning import GradGuardCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    callback = GradGuardCallback(job="lightning", server=server.addr, max_norm=1.0)
    trainer = pl.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    stats = callback.guard.stats
    assert stats.steps == 12 and stats.sent == 12
    job = server.wait_for_step("lightning", 12)
    assert job.layers == 2  # net.0, net.2


def test_lightning_resumes_from_a_checkpoint_with_the_advice_in_force(server, tmp_path):
    import lightning.pytorch as pl

    from gradguard.lightning import GradGuardCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))

    def trainer(steps, callback):
        return pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[callback],
        )

    first = GradGuardCallback(job="lightning-resume", server=server.addr)
    t = trainer(6, first)
    t.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    # What clip and LR-scale advice leave behind in the guard.
    first.guard._advised_clip, first.guard._lr_scale = 0.25, 0.5
    t.save_checkpoint(tmp_path / "run.ckpt")

    second = GradGuardCallback(job="lightning-resume", server=server.addr)
    trainer(10, second).fit(Module(), torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=tmp_path / "run.ckpt")
    stats = second.guard.stats
    assert (stats.clip_norm, stats.lr_scale) == (0.25, 0.5), stats
    # Steps 7-10 were sent, each clipped at the restored norm.
    assert (stats.sent, stats.clipped, second.guard.state_dict()["step"]) == (4, 4, 10), stats


def test_huggingface_callback_streams_every_optimizer_step(server, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from gradguard.huggingface import GradGuardTrainerCallback

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (32, 16))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    callback = GradGuardTrainerCallback(job="hf", server=server.addr, max_norm=1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_grad_norm=0,  # the guard clips, after measuring
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    stats = callback.guard.stats
    assert stats.steps == 8 and stats.sent == 8
    job = server.wait_for_step("hf", 8)
    assert job.layers == len(callback.guard.layers.names) > 10
    assert callback._loss is not None and math.isfinite(float(callback._loss))


def test_huggingface_takes_over_clipping_and_resumes_with_the_advice_in_force(server, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from gradguard.huggingface import GradGuardTrainerCallback

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    tokens = torch.randint(0, 64, (32, 16))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]

    def train(steps, callbacks, resume=None, restore_callbacks=False):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            max_grad_norm=0.5,  # the Trainer's clipping, left on as most runs leave it
            report_to=[],
            save_strategy="steps",
            save_steps=4,
            use_cpu=True,
            disable_tqdm=True,
            restore_callback_states_from_checkpoint=restore_callbacks,
        )
        trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=dataset, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, args

    first = GradGuardTrainerCallback(job="hf-resume", server=server.addr)

    class Advised(TrainerCallback):
        """What clip and LR-scale advice leave in the guard, at step 2."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                first.guard._advised_clip, first.guard._lr_scale = 0.25, 0.5

    _, args = train(4, [first, Advised()])
    # The guard clipped at the Trainer's norm, after measuring: the service
    # saw norms above it (a fresh GPT-2's are), and the Trainer's was off.
    assert args.max_grad_norm == 0 and first.guard.stats.clipped > 0
    assert first.guard.last_grad_norm > 0.5

    # A new callback (as in a new process), resumed the default way.
    again = GradGuardTrainerCallback(job="hf-resume", server=server.addr)
    train(6, [again], resume=str(tmp_path / "checkpoint-4"))
    state = again.guard.state_dict()
    assert (state["advised_clip"], state["lr_scale"], state["step"]) == (0.25, 0.5, 6), state
    assert again.guard.stats.sent == 2

    # With the Trainer restoring callbacks itself, it makes one anew from the
    # saved state; in the same process it keeps the original's callables.
    hooked = GradGuardTrainerCallback(job="hf-resume-2", server=server.addr, on_advice=lambda a, applied: None)
    trainer, _ = train(4, [hooked, Advised()])
    trainer, _ = train(6, [hooked], resume=str(tmp_path / "checkpoint-4"), restore_callbacks=True)
    made = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradGuardTrainerCallback)]
    assert len(made) == 1 and made[0] is not hooked and "on_advice" in made[0].options
    assert made[0].guard.state_dict()["step"] == 6


def test_kafka_transport_gets_advice_with_no_grpc(broker, make_server):
    server = make_server(extra=("--kafka-brokers", broker))
    run = Regression(peak_lr=0.05)
    run.poisoned = range(60, 61)
    applied = []
    with gradguard.watch(
        run.model,
        run.optimizer,
        job="over-kafka",
        kafka_brokers=broker,
        on_advice=lambda a, ok: applied.append(a.WhichOneof("action")),
    ) as guard:
        run.train_guarded(guard, steps=60)
        # The NaN step: the service advises skipping it; the advice comes back
        # over the advice topic while the loop goes on.
        run.train_guarded(guard, steps=1)
        while not applied:
            assert guard.stats.steps < 5000, "no advice came back over Kafka"
            run.train_guarded(guard, steps=1)
    assert applied[0] == "skip_step"
    assert guard.stats.connects == 1 and guard.stats.dropped == 0
    assert guard.stats.messages < guard.stats.sent / 2, "the summaries went in batches"
    assert server.wait_for_step("over-kafka", guard.stats.steps).layers == 3
