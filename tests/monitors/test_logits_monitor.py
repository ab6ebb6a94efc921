"""LogitsCheck with a real Trainer on the digits: the bug is named at its line, the fix trains."""

from __future__ import annotations

import inspect
import os
from typing import Any

import models
import pytest
import torch
import torch.nn.functional as F
from models import DigitsClassifier, digits, digits_loader, trainer
from pytorch_lightning.callbacks import Callback

from healthmon import HealthMonitor, NumericalHealthError
from healthmon.monitors.logits import TAG_CHECKS, TAG_FINDINGS, LogitsCheck


def _cross_entropy_line() -> str:
    """``tests/models.py:LINE`` of the cross_entropy call in ``DigitsClassifier.training_step``."""
    lines, first = inspect.getsourcelines(DigitsClassifier.training_step)
    (line,) = [first + i for i, text in enumerate(lines) if "F.cross_entropy(" in text]
    return f"{os.path.realpath(models.__file__)}:{line}"


def _real(where: str | None) -> str:
    assert where is not None
    path, _, line = where.rpartition(":")
    return f"{os.path.realpath(path)}:{line}"


def _fit(tmp_path, model, callbacks, max_steps: int = 30, seed: int = 0, **kwargs: Any):
    torch.manual_seed(seed)
    tr = trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    tr.fit(model, digits_loader(seed=seed))
    return tr


def _true_nll(model: DigitsClassifier, softmax_last: bool) -> float:
    """Mean negative log-likelihood of the labels under the model's predicted distribution."""
    x, y = digits()
    with torch.no_grad():
        out = model(x)
        return float(F.nll_loss(torch.log(out) if softmax_last else F.log_softmax(out, -1), y))


def test_probabilities_into_cross_entropy_are_named_at_the_line_and_the_fix_trains(tmp_path) -> None:
    torch.manual_seed(0)
    buggy = DigitsClassifier(softmax_last=True, lr=0.5)
    torch.manual_seed(0)
    fixed = DigitsClassifier(softmax_last=False, lr=0.5)
    check_buggy, check_fixed = LogitsCheck(), LogitsCheck()
    with pytest.warns(UserWarning, match="logits.probabilities"):
        _fit(tmp_path / "buggy", buggy, [check_buggy], max_steps=40)
    _fit(tmp_path / "fixed", fixed, [check_fixed], max_steps=40)

    (alert,) = check_buggy.alerts
    assert alert.code == "logits.probabilities" and alert.severity == "error"
    assert _real(alert.where) == _cross_entropy_line()
    assert "F.cross_entropy(logits, y)" in alert.hint
    assert alert.count == 3  # sampled steps 0, 1, 2 (and not again before step 100): one alert, counted
    assert check_fixed.alerts == []

    nll_buggy, nll_fixed = _true_nll(buggy, True), _true_nll(fixed, False)
    assert nll_fixed < 0.25 * nll_buggy  # measured: 0.16 vs 1.39, (nll_fixed, nll_buggy)

    assert check_buggy.driver.last[TAG_FINDINGS] == 1.0 and check_fixed.driver.last[TAG_FINDINGS] == 0.0
    assert check_fixed.driver.last[TAG_CHECKS] >= 1.0
    assert check_buggy.sampled_steps == check_fixed.sampled_steps == 3


class _StackProbe(Callback):
    """Records whether a torch function mode is active in forward and during backward."""

    def __init__(self) -> None:
        self.forward: dict[int, int] = {}
        self.backward: list[int] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backward.append(torch._C._len_torch_function_stack())


class _ProbedClassifier(DigitsClassifier):
    def __init__(self, probe: _StackProbe, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.probe = probe

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.probe.forward[self.trainer.global_step] = torch._C._len_torch_function_stack()
        return super().training_step(batch, batch_idx)


def test_interception_only_on_sampled_steps_and_only_in_forward(tmp_path) -> None:
    probe = _StackProbe()
    model = _ProbedClassifier(probe)
    _fit(tmp_path, model, [LogitsCheck(every_n_steps=5, first_steps=2), probe], max_steps=12)
    sampled = sorted(step for step, depth in probe.forward.items() if depth)
    assert sampled == [0, 1, 5, 10]
    assert probe.backward == [0] * 12
    assert torch._C._len_torch_function_stack() == 0


def test_interception_leaves_the_weights_bit_identical(tmp_path) -> None:
    def train(callbacks: list[Any]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = DigitsClassifier(softmax_last=True, momentum=0.9)
        _fit(tmp_path / str(len(callbacks)), model, callbacks, max_steps=8, deterministic=True)
        return [p.detach().clone() for p in model.parameters()]

    plain = train([])
    watched = train([LogitsCheck(every_n_steps=1)])
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def test_raise_policy_inside_health_monitor(tmp_path) -> None:
    mon = HealthMonitor(on_alert="raise", monitors=[LogitsCheck()], summary=False)
    with pytest.raises(NumericalHealthError) as info:
        _fit(tmp_path, DigitsClassifier(softmax_last=True), [mon], max_steps=5)
    assert info.value.alert.code == "logits.probabilities"
    assert _real(info.value.alert.where) == _cross_entropy_line()
    assert torch._C._len_torch_function_stack() == 0


class _Crash(DigitsClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        F.softmax(batch[0], -1)
        raise RuntimeError("boom")


def test_mode_is_popped_when_the_step_raises(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, _Crash(), [LogitsCheck()], max_steps=3)
    assert torch._C._len_torch_function_stack() == 0


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match=r"`first_steps`: expected an integer >= 0, got -1"):
        LogitsCheck(first_steps=-1)
    with pytest.raises(ValueError, match="`every_n_steps`"):
        LogitsCheck(every_n_steps=0)
    check = LogitsCheck(every_n_steps=lambda step: step == 7, first_steps=0)
    assert check.config()["first_steps"] == 0


def test_state_round_trip(tmp_path) -> None:
    check = LogitsCheck(first_steps=2)
    _fit(tmp_path, DigitsClassifier(), [check], max_steps=4)
    state = check.state_dict()
    restored = LogitsCheck(first_steps=2)
    restored.load_state_dict(state)
    assert restored.sampled_steps == check.sampled_steps == 2  # steps 0 and 1 (0 is also 0 % 100)
    assert restored.monitor_state() == check.monitor_state()


# ---- scores into the wrong loss: raw scores into nll_loss, ReLU'd scores into cross_entropy --------
class _NLLClassifier(DigitsClassifier):
    """nll_loss on the model's output: raw scores (the bug) or log_softmax of them (the fix)."""

    def __init__(self, *, log_softmax: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_softmax = log_softmax

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        scores = self(x)
        loss = F.nll_loss(F.log_softmax(scores, dim=1), y) if self.log_softmax else F.nll_loss(scores, y)
        self.log("train_loss", loss)
        return loss


def _line_of(fn: Any, text: str) -> str:
    lines, first = inspect.getsourcelines(fn)
    (line,) = [first + i for i, code in enumerate(lines) if text in code]
    return f"{os.path.realpath(inspect.getsourcefile(fn))}:{line}"


def _accuracy(model: DigitsClassifier) -> float:
    x, y = digits()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_raw_scores_into_nll_loss_are_named_at_the_line_and_the_fix_trains(tmp_path) -> None:
    torch.manual_seed(0)
    buggy = _NLLClassifier(log_softmax=False)
    torch.manual_seed(0)
    fixed = _NLLClassifier(log_softmax=True)
    check_buggy, check_fixed = LogitsCheck(), LogitsCheck()
    with pytest.warns(UserWarning, match="logits.unnormalized_log_probs"):
        tr_buggy = _fit(tmp_path / "buggy", buggy, [check_buggy], max_steps=60)
    tr_fixed = _fit(tmp_path / "fixed", fixed, [check_fixed], max_steps=60)

    (alert,) = check_buggy.alerts
    assert alert.code == "logits.unnormalized_log_probs" and alert.severity == "error"
    assert _real(alert.where) == _line_of(_NLLClassifier.training_step, "F.nll_loss(scores, y)")
    assert "F.log_softmax" in alert.hint and "unbounded below" in alert.message
    assert alert.value is not None and alert.value > 1.0  # the rows' logsumexp, not 0
    assert alert.count == 3  # sampled steps 0, 1, 2
    assert check_fixed.alerts == []

    # what the alert warns of: the loss falls below any log-likelihood while the model is worse
    loss_buggy, loss_fixed = (
        float(tr_buggy.callback_metrics["train_loss"]),
        float(tr_fixed.callback_metrics["train_loss"]),
    )
    assert loss_buggy < -10 < 0 < loss_fixed  # measured: -77 vs 0.63
    assert _accuracy(fixed) > _accuracy(buggy) + 0.1  # measured: 0.90 vs 0.65


class _ReluScoresClassifier(DigitsClassifier):
    """The digits MLP with a ReLU after its last layer: the class scores are clamped at 0."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net.append(torch.nn.ReLU())


def test_relu_on_the_scores_is_named_at_the_loss_line_and_hidden_relus_are_quiet(tmp_path) -> None:
    torch.manual_seed(0)
    buggy = _ReluScoresClassifier()
    torch.manual_seed(0)
    fixed = DigitsClassifier()  # ReLU between the hidden layers only
    check_buggy, check_fixed = LogitsCheck(), LogitsCheck()
    with pytest.warns(UserWarning, match="logits.clamped_scores"):
        _fit(tmp_path / "buggy", buggy, [check_buggy], max_steps=60)
    _fit(tmp_path / "fixed", fixed, [check_fixed], max_steps=60)

    (alert,) = check_buggy.alerts
    assert alert.code == "logits.clamped_scores" and alert.severity == "warning"
    assert _real(alert.where) == _cross_entropy_line()
    assert "relu" in alert.message and "ReLU" in alert.hint
    assert alert.value is not None and 0.3 < alert.value < 0.8  # measured: 0.55 of the scores are 0
    assert alert.count == 3
    assert check_fixed.alerts == []
    assert _accuracy(fixed) > _accuracy(buggy) + 0.1  # the clamp slows training; measured: 0.90 vs 0.71
