"""HealthMonitor with a real Trainer on CPU: healthy runs, injected faults, logged values."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from models import DigitsClassifier, digits_loader, trainer
from tensorboard.backend.event_processing import event_accumulator as ea

from healthmon import HealthMonitor, NumericalHealthError
from healthmon.monitors import GradientNormMonitor, NonFiniteMonitor


def _scalars(log_dir: str) -> dict[str, dict[int, float]]:
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


class RecordingClassifier(DigitsClassifier):
    """Records the reference global gradient norm (concatenated vector) at each optimizer step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = torch.cat([p.grad.reshape(-1) for p in self.parameters() if p.grad is not None])
        self.reference[self.trainer.global_step] = float(torch.linalg.vector_norm(grads))


def test_healthy_run_raises_nothing_and_logs_the_documented_tags(tmp_path: Any) -> None:
    mon = HealthMonitor()
    model = RecordingClassifier(hidden=(32,), lr=0.05)
    t = trainer(tmp_path, [mon], max_steps=60)
    t.fit(model, digits_loader())
    assert [a for a in mon.alerts if a.severity != "info"] == []
    log_dir = t.logger.log_dir
    assert mon.report_path == os.path.join(log_dir, "healthmon_report.json")
    tags = _scalars(log_dir)
    for tag in [
        "healthmon/loss",
        "healthmon/grad/norm",
        "healthmon/grad/layer/net.0",
        "healthmon/update_ratio/net.2",
    ]:
        assert tag in tags, tag
    # the logged norm is the norm of the concatenated gradient, measured before the step
    for step, ref in model.reference.items():
        assert tags["healthmon/grad/norm"][step] == pytest.approx(ref, rel=1e-5)
    # and the user's own metrics sit in the same event files
    assert "train_loss" in tags
    assert tags["healthmon/loss"][10] == pytest.approx(tags["train_loss"][10], rel=1e-6)
    report = json.loads(Path(mon.report_path).read_text())
    assert report["schema"] == "healthmon.report" and report["run"]["status"] == "completed"
    assert report["run"]["global_step"] == 60 and report["counts"]["error"] == 0


def test_per_layer_norms_and_update_ratios_are_exact(tmp_path: Any) -> None:
    class Recording(DigitsClassifier):
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            self.before = {n: p.detach().clone() for n, p in self.named_parameters()}
            self.layer = {
                layer: float(
                    torch.linalg.vector_norm(
                        torch.cat(
                            [self.get_parameter(f"{layer}.{k}").grad.reshape(-1) for k in ("weight", "bias")]
                        )
                    )
                )
                for layer in ("net.0", "net.2")
            }

    model = Recording(hidden=(16,), lr=0.1)
    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path, [mon], max_steps=1)
    t.fit(model, digits_loader())
    tags = _scalars(t.logger.log_dir)
    for layer, ref in model.layer.items():
        assert tags[f"healthmon/grad/layer/{layer}"][0] == pytest.approx(ref, rel=1e-5)
    for layer in ("net.0", "net.2"):
        w_before = torch.cat([model.before[f"{layer}.{k}"].reshape(-1) for k in ("weight", "bias")])
        w_after = torch.cat(
            [model.get_parameter(f"{layer}.{k}").detach().reshape(-1) for k in ("weight", "bias")]
        )
        ref = float(torch.linalg.vector_norm(w_after - w_before) / torch.linalg.vector_norm(w_before))
        assert tags[f"healthmon/update_ratio/{layer}"][0] == pytest.approx(ref, rel=1e-4)


def test_clipping_logs_the_norm_before_and_after(tmp_path: Any) -> None:
    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path, [mon], max_steps=5, gradient_clip_val=0.1)
    t.fit(RecordingClassifier(), digits_loader())
    tags = _scalars(t.logger.log_dir)
    for step in range(5):
        assert tags["healthmon/grad/norm"][step] > 0.1  # before clipping
        assert tags["healthmon/grad/norm_clipped"][step] == pytest.approx(0.1, rel=1e-4)


def test_gradient_accumulation_measures_the_accumulated_gradient(tmp_path: Any) -> None:
    class MicroBatchLosses(RecordingClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.micro.setdefault(self.trainer.global_step, []).append(float(loss))
            return loss

    mon = HealthMonitor(summary=False)
    model = MicroBatchLosses()
    model.micro = {}
    t = trainer(tmp_path, [mon], max_steps=4, accumulate_grad_batches=3)
    t.fit(model, digits_loader())
    tags = _scalars(t.logger.log_dir)
    assert set(model.reference) == {0, 1, 2, 3}
    for step, ref in model.reference.items():
        assert tags["healthmon/grad/norm"][step] == pytest.approx(ref, rel=1e-5)
        # the loss of the step is the mean over its micro-batches, not the last one's share
        assert len(model.micro[step]) == 3
        assert tags["healthmon/loss"][step] == pytest.approx(sum(model.micro[step]) / 3, rel=1e-6)


INJECT_LINE = next(
    i
    for i, line in enumerate(
        Path(os.path.join(os.path.dirname(__file__), "..", "models.py")).read_text().splitlines(), 1
    )
    if 'output * float("nan")' in line
)


def test_nan_in_forward_names_the_module_and_stop_keeps_weights_finite(tmp_path: Any) -> None:
    model = DigitsClassifier(hidden=(32, 32), nan_at_step=5, nan_layer=2)  # net.2 is the 2nd Linear
    mon = HealthMonitor(on_alert="stop", summary=False)
    t = trainer(tmp_path, [mon], max_steps=50)
    t.fit(model, digits_loader())
    codes = {a.code: a for a in mon.alerts}
    # the NaN comes from the forward hook of net.2 (tests/models.py): the line, and the module, are named
    assert codes["activation.nonfinite"].where == f"tests/models.py:{INJECT_LINE}"
    assert "in net.2 (Linear)" in codes["activation.nonfinite"].message
    assert "NaN literal" in codes["activation.nonfinite"].message
    assert codes["activation.nonfinite"].step == 5
    assert {"loss.nonfinite", "grad.nonfinite"} <= set(codes)
    assert t.global_step <= 6 and t.should_stop
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    crash = json.loads(Path(os.path.join(t.logger.log_dir, "healthmon_crash.json")).read_text())
    assert crash["global_step"] == 5 and crash["first_nonfinite_module"].startswith("net.2")
    assert crash["origin"]["where"] == f"tests/models.py:{INJECT_LINE}"
    assert "net.0.weight" in crash["nonfinite_gradients"] and crash["batch_idx"] == 5
    report = json.loads(Path(mon.report_path).read_text())
    assert report["run"]["status"] == "stopped"


def test_raise_policy_raises_inside_fit_before_the_step(tmp_path: Any) -> None:
    model = DigitsClassifier(nan_at_step=3, nan_layer=0)
    mon = HealthMonitor(on_alert="raise", summary=False)
    t = trainer(tmp_path, [mon], max_steps=50)
    with pytest.raises(NumericalHealthError) as info:
        t.fit(model, digits_loader())
    alert = info.value.alert
    assert alert.code == "activation.nonfinite" and alert.where == f"tests/models.py:{INJECT_LINE}"
    assert "in net.0 (Linear)" in alert.message
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    report = json.loads(Path(mon.report_path).read_text())
    assert report["run"]["status"] == "exception" and "NumericalHealthError" in report["run"]["error"]


def test_nan_in_the_batch_is_blamed_on_the_input(tmp_path: Any) -> None:
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    x[3, 5] = float("nan")
    x[17, 0] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    mon = HealthMonitor(on_alert="stop", summary=False)
    trainer(tmp_path, [mon], max_steps=3).fit(DigitsClassifier(), loader)
    act = next(a for a in mon.alerts if a.code == "batch.nonfinite")
    assert act.where == "batch[0]" and act.step == 0
    assert "in 2 of its 64 samples (indices 3, 17)" in act.message
    assert "activation.nonfinite" not in {a.code for a in mon.alerts}


def test_learning_rate_100x_too_high_diverges(tmp_path: Any) -> None:
    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path, [mon], max_steps=80)
    t.fit(DigitsClassifier(lr=10.0), digits_loader())
    codes = {a.code for a in mon.alerts}
    assert codes & {"loss.divergence", "grad.explosion"}


def test_lightning_pytorch_trainer_works_the_same(tmp_path: Any) -> None:
    import lightning.pytorch as L

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    mon = HealthMonitor(summary=False)
    t = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        callbacks=[mon],
        logger=L.loggers.TensorBoardLogger(str(tmp_path)),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    t.fit(Model(), digits_loader())
    assert "healthmon/grad/norm" in _scalars(t.logger.log_dir)
    assert os.path.exists(mon.report_path)


def test_without_tensorboard_logger_writes_own_event_files(tmp_path: Any) -> None:
    from pytorch_lightning.loggers import CSVLogger

    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path, [mon], max_steps=5, logger=CSVLogger(str(tmp_path), name="csv"))
    t.fit(DigitsClassifier(), digits_loader())
    own = os.path.join(str(tmp_path), "healthmon")
    assert "healthmon/grad/norm" in _scalars(own)
    assert mon.report_path == os.path.join(own, "healthmon_report.json")
    metrics_csv = glob.glob(os.path.join(str(tmp_path), "csv", "*", "metrics.csv"))[0]
    header = Path(metrics_csv).read_text().splitlines()[0]
    assert "healthmon/grad/norm" in header  # other loggers get log_metrics


def test_custom_scalars_layout_and_alert_text_are_in_the_event_files(tmp_path: Any) -> None:
    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path, [mon], max_steps=30)
    t.fit(DigitsClassifier(lr=10.0), digits_loader())
    acc = ea.EventAccumulator(t.logger.log_dir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    tensors = acc.Tags()["tensors"]
    assert "custom_scalars__config__" in tensors
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["gradient norm vs loss"] == ["healthmon/grad/norm", "healthmon/loss"]
    assert "healthmon/alerts/text_summary" in tensors
    config = acc.Tensors("healthmon/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"on_alert": "warn"' in config and "GradientNormMonitor" in config


def test_monitor_never_changes_the_run(tmp_path: Any) -> None:
    def run(callbacks: list[Any], root: str) -> list[torch.Tensor]:
        torch.manual_seed(123)
        model = DigitsClassifier(hidden=(32, 32), momentum=0.9)
        trainer(root, callbacks, max_steps=40, gradient_clip_val=1.0).fit(model, digits_loader(seed=1))
        return [p.detach().clone() for p in model.parameters()]

    plain = run([], str(tmp_path / "plain"))
    watched = run([HealthMonitor(summary=False)], str(tmp_path / "watched"))
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def test_standalone_monitors_work_without_the_bundle(tmp_path: Any) -> None:
    gn, nf = GradientNormMonitor(), NonFiniteMonitor(on_alert="stop")
    t = trainer(tmp_path, [gn, nf], max_steps=20)
    model = DigitsClassifier(nan_at_step=8)
    t.fit(model, digits_loader())
    assert "healthmon/grad/norm" in _scalars(t.logger.log_dir)
    assert {a.code for a in nf.alerts} >= {"loss.nonfinite", "activation.nonfinite"}
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_state_survives_a_checkpoint_round_trip(tmp_path: Any) -> None:
    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path, [mon], max_steps=30, enable_checkpointing=True)
    t.fit(DigitsClassifier(lr=10.0), digits_loader())
    ckpt = glob.glob(os.path.join(str(tmp_path), "**", "*.ckpt"), recursive=True)[0]
    before = [(a.code, a.where, a.count) for a in mon.alerts]
    assert before
    resumed = HealthMonitor(summary=False)
    resumed.load_state_dict(torch.load(ckpt, weights_only=False)["callbacks"][mon.state_key])
    assert [(a.code, a.where, a.count) for a in resumed.alerts] == before
    gn = resumed.monitor(GradientNormMonitor)
    assert gn is not None and gn.divergence.baseline is not None
    assert gn.divergence.baseline == mon.monitor(GradientNormMonitor).divergence.baseline


def test_callable_cadence(tmp_path: Any) -> None:
    steps: list[int] = []

    def every_third(step: int) -> bool:
        steps.append(step)
        return step % 3 == 0

    mon = HealthMonitor(monitors=[GradientNormMonitor(every_n_steps=every_third)], summary=False)
    t = trainer(tmp_path, [mon], max_steps=9)
    t.fit(DigitsClassifier(), digits_loader())
    assert steps == list(range(9))
    assert sorted(_scalars(t.logger.log_dir)["healthmon/grad/norm"]) == [0, 3, 6]
