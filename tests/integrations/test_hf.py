"""The Hugging Face ``Trainer`` with ``HFHealthCallback``: the Lightning tests' counterparts.

A tiny GPT-2 built from its config (no download) on synthetic Markov tokens, on the CPU: a healthy
run with no warning, the loss tag equal to the Trainer's logged loss at every step, the seeded
bugs caught with the codes Lightning gives, the observer effect, the report and the stop policy.
Skipped where ``transformers`` (or ``accelerate``, which its ``Trainer`` needs) is missing.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions  # noqa: E402

from healthmon import NumericalHealthError  # noqa: E402
from healthmon.cli import main as healthmon_cli  # noqa: E402
from healthmon.integrations.hf import HFHealthCallback  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from hf_trainer import MarkovTokens, tiny_gpt2  # noqa: E402


def fit(
    tmp_path: Any,
    *,
    callback: HFHealthCallback | None = None,
    model: torch.nn.Module | None = None,
    lr: float = 3e-3,
    steps: int = 100,
    **options: Any,
) -> Trainer:
    """Train the tiny GPT-2 with the Trainer's defaults (AdamW, linear schedule, clipping at 1)."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=lr,
        warmup_steps=15,
        logging_steps=options.pop("logging_steps", 1),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **options,
    )
    trainer = Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=args,
        train_dataset=MarkovTokens(1024),
        callbacks=[callback] if callback is not None else [],
    )
    trainer.train()
    return trainer


def scalars(log_dir: str, tag: str) -> dict[int, float]:
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def loud(callback: HFHealthCallback) -> list[str]:
    return [f"{a.code} step {a.step} {a.where}: {a.message}" for a in callback.alerts if a.severity != "info"]


def line_of(obj: Any, text: str) -> str:
    """``file:LINE`` of the first line of ``obj``'s source holding ``text``."""
    lines, start = inspect.getsourcelines(obj)
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"{os.path.basename(inspect.getsourcefile(obj) or '')}:{start + offset}"


# ---- the healthy run -------------------------------------------------------------------------------
def test_healthy_run_with_accumulation(tmp_path: Any) -> None:
    health = HFHealthCallback(summary=False)
    trainer = fit(tmp_path, callback=health, steps=100, gradient_accumulation_steps=2)
    assert not loud(health), "false alarm on a healthy run:\n" + "\n".join(loud(health))
    assert trainer.state.global_step == 100
    log_dir = health.log_dir
    assert log_dir == os.path.join(str(tmp_path), "healthmon")
    # healthmon/loss is the step's mean loss: the Trainer's logged loss at every step
    logged = {e["step"] - 1: e["loss"] for e in trainer.state.log_history if "loss" in e}
    ours = scalars(log_dir, "healthmon/loss")
    assert set(ours) == set(logged) == set(range(100))
    wrong = {s: (ours[s], v) for s, v in logged.items() if abs(ours[s] - v) > 1e-5 * abs(v)}
    assert not wrong, f"healthmon/loss is not the Trainer's loss: {list(wrong.items())[:5]}"
    first, last = sum(ours[s] for s in range(10)) / 10, sum(ours[s] for s in range(90, 100)) / 10
    assert last < first - 1.0, f"the loss did not fall: {first} -> {last}"
    # the gradient norm healthmon measures is the pre-clip norm the Trainer logs as grad_norm
    norms = scalars(log_dir, "healthmon/grad/norm")
    grad_norm = {e["step"] - 1: e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e}
    assert norms and all(abs(norms[s] - grad_norm[s]) <= 1e-4 * grad_norm[s] for s in norms)
    assert trainer.args.max_grad_norm == 1.0  # the setting is given back after the fit
    # the report beside the events, and `healthmon check`
    with open(health.report_path or "") as f:
        report = json.load(f)
    assert report["run"]["status"] == "completed" and report["run"]["global_step"] == 100
    assert healthmon_cli(["check", log_dir]) == 0


class NoLossKwargsGPT2(GPT2LMHeadModel):
    """A model whose forward takes no ``num_items_in_batch``.

    The Trainer divides its loss by the micro-batches of the step itself (fewer in the last step of
    an epoch).
    """

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return super().forward(input_ids=input_ids, labels=labels)


def test_loss_with_an_uneven_last_accumulation_step(tmp_path: Any) -> None:
    # 1024 samples / 16 = 64 micro-batches per epoch, 3 per step: the 22nd step has only one
    health = HFHealthCallback(summary=False)
    trainer = fit(
        tmp_path,
        callback=health,
        model=NoLossKwargsGPT2(tiny_gpt2().config),
        steps=25,
        gradient_accumulation_steps=3,
    )
    assert not trainer.model_accepts_loss_kwargs and not loud(health)
    logged = {e["step"] - 1: e["loss"] for e in trainer.state.log_history if "loss" in e}
    ours = scalars(health.log_dir or "", "healthmon/loss")
    assert set(ours) == set(logged)
    assert all(abs(ours[s] - v) <= 1e-5 * v for s, v in logged.items()), (ours[21], logged[21])


# ---- seeded bugs -------------------------------------------------------------------------------------
class SoftmaxHeadGPT2(GPT2LMHeadModel):
    """The bug: the loss is cross-entropy of the softmax probabilities instead of the logits."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        logits = self.lm_head(self.transformer(input_ids).last_hidden_state)
        loss = None
        if labels is not None:
            probs = torch.softmax(logits[:, :-1], -1)
            loss = F.cross_entropy(probs.flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)


class LogOfZeroGPT2(GPT2LMHeadModel):
    """The bug: a log of rectified features (log(0) = -inf, then NaN in the head)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        hidden = self.transformer(input_ids).last_hidden_state
        features = torch.log(torch.relu(hidden))
        logits = self.lm_head(features)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)


def sick(cls: type) -> torch.nn.Module:
    return cls(tiny_gpt2().config)


def test_softmax_into_cross_entropy(tmp_path: Any) -> None:
    health = HFHealthCallback(summary=False)
    fit(tmp_path, callback=health, model=sick(SoftmaxHeadGPT2), steps=4)
    found = [a for a in health.alerts if a.code == "logits.probabilities"]
    assert found, loud(health)
    assert found[0].where is not None and found[0].where.endswith(line_of(SoftmaxHeadGPT2, "F.cross_entropy"))


def test_nan_from_log_of_zero_and_stop(tmp_path: Any) -> None:
    health = HFHealthCallback(on_alert="stop", summary=False)
    trainer = fit(tmp_path, callback=health, model=sick(LogOfZeroGPT2), steps=20)
    found = [a for a in health.alerts if a.code == "activation.nonfinite"]
    assert found, loud(health)
    assert found[0].where is not None and found[0].where.endswith(line_of(LogOfZeroGPT2, "torch.log"))
    # the stop policy: the Trainer stopped after the first step, its weights untouched
    assert trainer.control.should_training_stop and trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    with open(health.report_path or "") as f:
        assert json.load(f)["run"]["status"] == "stopped"
    assert healthmon_cli(["check", health.log_dir or ""]) == 1


def test_raise_writes_the_report(tmp_path: Any) -> None:
    health = HFHealthCallback(on_alert="raise", summary=False)
    with pytest.raises(NumericalHealthError):
        fit(tmp_path, callback=health, model=sick(LogOfZeroGPT2), steps=5)
    with open(health.report_path or "") as f:
        report = json.load(f)
    assert report["run"]["status"] == "exception"
    assert "activation.nonfinite" in {a["code"] for a in report["alerts"]}


def lightning_codes(root: Any, lr: float, steps: int) -> set[str]:
    """The warning and error codes ``HealthMonitor`` gives the same run under Lightning.

    The same model, data and schedule; the Trainer's defaults: AdamW without weight decay, linear
    warm-up, clipping at 1.
    """
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from healthmon import HealthMonitor

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_gpt2()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
            schedule = transformers.get_linear_schedule_with_warmup(opt, 15, steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    health = HealthMonitor(summary=False, report=False)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[health],
        gradient_clip_val=1.0,
        accelerator="cpu",
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LM(), DataLoader(MarkovTokens(1024), batch_size=16, shuffle=True))
    return {a.code for a in health.alerts if a.severity != "info"}


STEPS_100X = 300  # long enough that the early Hessian estimates fit their 5% of the run


def test_learning_rate_100x_too_high(tmp_path: Any) -> None:
    health = HFHealthCallback(summary=False)
    fit(tmp_path / "hf", callback=health, lr=0.3, steps=STEPS_100X, logging_steps=10)
    codes = {a.code for a in health.alerts if a.severity != "info"}
    assert "hessian.sharpness" in codes, loud(health)
    assert codes == lightning_codes(tmp_path / "lightning", lr=0.3, steps=STEPS_100X)


# ---- observer effect and output ----------------------------------------------------------------
def test_observer_effect_bit_identical_weights(tmp_path: Any) -> None:
    options = {"steps": 30, "gradient_accumulation_steps": 2, "logging_steps": 5}
    plain = fit(tmp_path / "plain", **options).model.state_dict()
    watched = fit(
        tmp_path / "watched", callback=HFHealthCallback(summary=False), **options
    ).model.state_dict()
    assert plain.keys() == watched.keys()
    differ = [k for k in plain if not torch.equal(plain[k], watched[k])]
    assert not differ, f"healthmon changed the weights: {differ[:5]}"


def test_tensorboard_tags_and_own_log_dir(tmp_path: Any) -> None:
    health = HFHealthCallback(summary=False, log_dir=str(tmp_path / "tb"))
    fit(tmp_path / "out", callback=health, steps=6, logging_steps=2, max_grad_norm=0.0)
    assert health.log_dir == str(tmp_path / "tb")
    assert set(scalars(health.log_dir, "healthmon/loss")) == {0, 2, 4}
    assert set(scalars(health.log_dir, "healthmon/grad/norm")) == {0, 2, 4}
    assert os.path.exists(tmp_path / "tb" / "healthmon_report.json")


def test_clipping_left_to_the_trainer_logs_its_preclip_norm(tmp_path: Any, monkeypatch: Any) -> None:
    # Under DeepSpeed/FSDP/XLA the Trainer clips before the monitors: they see clipped gradients
    monkeypatch.setattr("healthmon.integrations.hf.distributed_type", lambda: "FSDP")
    health = HFHealthCallback(summary=False)
    trainer = fit(tmp_path, callback=health, steps=6, max_grad_norm=0.5)
    log_dir = health.log_dir or ""
    grad_norm = {e["step"] - 1: e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e}
    preclip = scalars(log_dir, "healthmon/grad/norm_preclip")
    assert set(preclip) == set(grad_norm) == set(range(6))
    assert all(abs(preclip[s] - v) <= 1e-6 * v for s, v in grad_norm.items())
    norms = scalars(log_dir, "healthmon/grad/norm")
    assert max(grad_norm.values()) > 0.5 and all(v <= 0.5 + 1e-4 for v in norms.values())


def test_pure_fp16_weights_without_loss_scaling(tmp_path: Any) -> None:
    """``model.half()`` trained without a GradScaler: the same code Lightning's ``16-true`` gives."""
    callback = HFHealthCallback(summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tmp_path, callback=callback, model=tiny_gpt2().half(), steps=30, max_grad_norm=0.0)
    codes = {a.code for a in callback.alerts}
    assert "grad.underflow" in codes, loud(callback)
