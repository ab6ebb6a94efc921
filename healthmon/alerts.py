"""Alerts: the record users see, the registry of codes, de-duplication and the on-alert policy.

This module is pure Python (no torch, no Lightning) so the CLI and the report reader can use it
without importing a training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: How to clip gradients, in every loop healthmon runs in (used by several hints).
CLIP_HOW = "(Lightning: Trainer(gradient_clip_val=1.0); a plain loop: torch.nn.utils.clip_grad_norm_)"

Severity = Literal["info", "warning", "error"]
OnAlert = Literal["warn", "raise", "stop"]

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
ON_ALERT_CHOICES: tuple[str, ...] = ("warn", "raise", "stop")


def severity_rank(severity: str) -> int:
    """Order of severities: info < warning < error."""
    return SEVERITIES.index(check_severity(severity, "severity"))


def check_severity(value: object, name: str) -> str:
    """Validate a severity argument with an error that names it."""
    if value not in SEVERITIES:
        raise ValueError(f"`{name}`: expected one of 'info', 'warning', 'error', got {value!r}.")
    return str(value)


@dataclass(frozen=True)
class CodeInfo:
    """What a code means: its default severity, a one-sentence explanation and a concrete fix."""

    code: str
    severity: Severity
    explanation: str
    hint: str
    seed: str = ""


def _codes(*infos: CodeInfo) -> dict[str, CodeInfo]:
    return {info.code: info for info in infos}


#: The registry of alert codes. Codes are stable ids; see DESIGN.md for the contract.
CODES: dict[str, CodeInfo] = _codes(
    CodeInfo(
        "loss.nonfinite",
        "error",
        "The loss is NaN or Inf.",
        "Look for log(0), division by zero or overflow in the loss; lower the learning rate; "
        "use F.cross_entropy / log_softmax instead of hand-written formulas.",
        "Overflow and underflow",
    ),
    CodeInfo(
        "grad.nonfinite",
        "error",
        "A gradient holds NaN or Inf (where: the user's file.py:LINE when the backward of an operation "
        "there produced it, else the first such parameter).",
        "Clip gradients " + CLIP_HOW + ", lower the learning rate, or use loss "
        "scaling / bf16 instead of plain fp16.",
        "Overflow and underflow",
    ),
    CodeInfo(
        "amp.scaler_unstable",
        "error",
        "The fp16 GradScaler cannot find a working loss scale: it skips step after step, or its "
        "scale fell below 1.",
        "Gradients that are non-finite at every loss scale come from the model, not the scaler: "
        "find what overflows float16 (unnormalised inputs or targets, a loss summed over a huge "
        "number of terms, an unguarded sqrt/log/division; `where` names the first parameter whose "
        "gradient was non-finite) and fix it, keep that computation in float32, or train with "
        "precision='bf16-mixed', which has float32's range and needs no scaler.",
        "Overflow and underflow",
    ),
    CodeInfo(
        "activation.nonfinite",
        "error",
        "The forward pass produced NaN or Inf (where: the user's file.py:LINE of the first operation "
        "that turned finite inputs into NaN/Inf; the module running it is named in the message).",
        "Inspect the named operation's inputs; guard log/sqrt/division against 0 and use the "
        "numerically stable functional forms (log_softmax, logsumexp).",
        "Overflow and underflow",
    ),
    CodeInfo(
        "batch.nonfinite",
        "error",
        "The batch itself holds NaN or Inf (where: the tensor's path in the batch, e.g. batch[0]; the "
        "message lists the sample indices).",
        "Fix the data: drop or repair those samples (torch.nan_to_num, imputation) or the transform that "
        "produced them.",
        "Overflow and underflow",
    ),
    CodeInfo(
        "update.nonfinite",
        "error",
        "An optimizer step wrote NaN or Inf into the weights although the gradients were finite "
        "(where: the optimizer and parameter group).",
        "Keep float32 master weights for low-precision training, use an eps the weights' dtype can "
        "represent, and check the learning-rate schedule.",
        "Rounding: (a + 1e-8) == a",
    ),
    CodeInfo(
        "grad.zero",
        "warning",
        "Gradients are exactly zero while the loss is not near zero: they were rounded or flushed "
        "to zero, or the units are dead.",
        "Check for saturated activations (sigmoid/tanh, dead ReLUs), probabilities fed to a loss "
        "that expects logits, or low-precision gradients without loss scaling.",
        "Rounding the gradient to zero",
    ),
    CodeInfo(
        "grad.underflow",
        "warning",
        "Gradient magnitudes fall in or below the subnormal range of their dtype.",
        "Use loss scaling (precision='16-mixed') or bf16-mixed, or keep this layer in float32.",
        "Underflow",
    ),
    CodeInfo(
        "grad.dead_units",
        "warning",
        "Most units of a ReLU-family layer received zero gradient for the whole batch (dying ReLU).",
        "Lower the learning rate, check the bias initialisation, or use LeakyReLU/GELU.",
        "Rounding the gradient to zero",
    ),
    CodeInfo(
        "update.stale",
        "warning",
        "Optimizer steps are smaller than half an ulp of the weights: the step changes nothing.",
        "Keep float32 master weights (mixed precision instead of pure bf16/fp16 weights) or raise "
        "the learning rate.",
        "Rounding: (a + 1e-8) == a in float32",
    ),
    CodeInfo(
        "grad.vanishing",
        "warning",
        "The gradient norm collapsed, or decays by orders of magnitude along depth.",
        "Use ReLU-family activations with He/Kaiming init, residual connections or normalisation "
        "layers; check for saturating sigmoid/tanh stacks.",
        "Gradient descent halts where the gradient is ~0",
    ),
    CodeInfo(
        "grad.explosion",
        "warning",
        "The gradient norm spiked far above its running level, or (first steps) one step's update or"
        " gradient was far too large for a layer's weights.",
        "Lower the learning rate or clip gradients " + CLIP_HOW + ".",
        "Too high a learning rate usually causes explosion",
    ),
    CodeInfo(
        "grad.norm_rising",
        "info",
        "The gradient norm rises while the loss falls: training is not near a critical point.",
        "Nothing to fix: this is normal early in training (Goodfellow fig.: gradient norm vs "
        "classification error). It means the optimizer is not converging to a minimum yet.",
        "Gradient norm grows during successful training",
    ),
    CodeInfo(
        "loss.divergence",
        "error",
        "The loss rises steadily or blows up.",
        "Lower the learning rate (try 10x smaller), add warm-up, or clip gradients.",
        "Too high a learning rate usually causes explosion",
    ),
    CodeInfo(
        "logits.probabilities",
        "error",
        "A loss that expects logits received probabilities.",
        "Remove the softmax/sigmoid before the loss: F.cross_entropy(logits, y) or "
        "nn.BCEWithLogitsLoss()(logits, y).",
        "Computing cross-entropy using probabilities instead of logits",
    ),
    CodeInfo(
        "logits.unnormalized_log_probs",
        "error",
        "A loss that expects log-probabilities (nll_loss, NLLLoss, the input of kl_div/KLDivLoss) "
        "received raw scores: its rows do not normalise, so the loss is unbounded below and falls "
        "while the model gets worse.",
        "Apply log_softmax first: F.nll_loss(F.log_softmax(scores, dim=1), y) (or simply "
        "F.cross_entropy(scores, y)); F.kl_div(F.log_softmax(scores, dim=-1), target).",
        "Computing cross-entropy using probabilities instead of logits",
    ),
    CodeInfo(
        "logits.clamped_scores",
        "warning",
        "Class scores were clamped at 0 (relu, clamp(min=0)) before a logits loss: every score stuck "
        "at exactly 0 passes no gradient.",
        "Remove the ReLU/clamp after the last layer: logits must be free to go negative (keep the "
        "activation between hidden layers only).",
        "Rounding the gradient to zero",
    ),
    CodeInfo(
        "logits.naive_log_softmax",
        "warning",
        "log(softmax(x)) instead of log_softmax(x).",
        "Use F.log_softmax(x, dim=-1) (and F.nll_loss), or F.cross_entropy on the logits.",
        "Softmax / log-softmax stability",
    ),
    CodeInfo(
        "logits.naive_logsumexp",
        "warning",
        "log(sum(exp(x))) without subtracting the max.",
        "Use torch.logsumexp(x, dim=...) instead of torch.log(torch.exp(x).sum(...)).",
        "logsumexp: subtract the max",
    ),
    CodeInfo(
        "logits.naive_softmax",
        "warning",
        "A softmax written as exp(x) / exp(x).sum() without the max.",
        "Use torch.softmax(x, dim=-1) (or F.log_softmax for log-probabilities).",
        "Softmax: subtract the max",
    ),
    CodeInfo(
        "logits.sigmoid_bce",
        "info",
        "BCELoss on sigmoid outputs: legal, but less stable than the logits form.",
        "Use nn.BCEWithLogitsLoss()(logits, y) on the pre-sigmoid values.",
        "Computing cross-entropy using probabilities instead of logits",
    ),
    CodeInfo(
        "softmax.saturated",
        "warning",
        "Probabilities that are exactly 0 or 1 reach a log or a loss: their gradient is lost.",
        "Work in log space: F.log_softmax / F.logsigmoid, or the logits forms of the losses "
        "(F.cross_entropy, BCEWithLogitsLoss).",
        "Underflow: exp(-large) rounds to 0",
    ),
    CodeInfo(
        "hessian.sharpness",
        "warning",
        "The top Hessian eigenvalue is above the optimizer's stability limit (2/lr for SGD).",
        "Lower the learning rate below 2/lambda_max, or add warm-up.",
        "Big eigenvalues slow you down; lr must stay below 2/lambda_max",
    ),
    CodeInfo(
        "hessian.negative_curvature",
        "info",
        "A significantly negative Hessian eigenvalue: the run is in a saddle region.",
        "Usually harmless for SGD-type optimizers (they escape saddles); worth knowing when progress stalls.",
        "Saddle points and negative curvature",
    ),
    CodeInfo(
        "monitor.skipped",
        "info",
        "A check was skipped because the run does not support it.",
        "See the message; nothing is wrong with the run itself.",
    ),
)


def code_info(code: str) -> CodeInfo:
    """The registry entry of `code`, with an error that lists the known codes."""
    try:
        return CODES[code]
    except KeyError:
        raise ValueError(f"`code`: expected a registered alert code, got {code!r}.") from None


#: Fixes for one call form of a code, refining its registry hint: ``{code: {form: hint}}``.
#: ``logits.probabilities`` names the loss that received probabilities, ``logits.naive_log_softmax``
#: the form of the two-step log-softmax.
CALL_HINTS: dict[str, dict[str, str]] = {
    "logits.probabilities": {
        "cross_entropy": (
            "Pass the raw logits: F.cross_entropy(logits, y) (remove the softmax before the loss)."
        ),
        "nll_loss": "Use F.log_softmax(logits, dim=1) before F.nll_loss, or F.cross_entropy(logits, y).",
        "bce_with_logits": (
            "Pass the pre-sigmoid values: nn.BCEWithLogitsLoss()(logits, y) (remove the sigmoid)."
        ),
        "kl_div": (
            "kl_div expects log-probabilities as input: F.kl_div(F.log_softmax(student, dim=-1), target)."
        ),
    },
    "logits.naive_log_softmax": {
        "log_of_softmax": (
            "Use F.log_softmax(logits, dim=-1) instead of torch.log(F.softmax(logits, dim=-1))."
        ),
        "double_softmax": "Apply F.log_softmax to the logits, not to softmax outputs (remove the softmax).",
    },
}


def call_hint(code: str, form: str | None = None) -> str:
    """The fix for ``code`` written in ``form`` (see :data:`CALL_HINTS`), else the registry's hint.

    >>> call_hint("logits.naive_log_softmax", "double_softmax")
    'Apply F.log_softmax to the logits, not to softmax outputs (remove the softmax).'
    >>> call_hint("logits.naive_logsumexp") == code_info("logits.naive_logsumexp").hint
    True
    """
    hint = CALL_HINTS.get(code, {}).get(form or "")
    return hint if hint is not None else code_info(code).hint


@dataclass
class Alert:
    """One numerical-health finding.

    Attributes:
        code: stable id from :data:`CODES`.
        severity: "info", "warning" or "error".
        step: ``trainer.global_step`` when first detected.
        message: one sentence, what is wrong.
        hint: what to change.
        where: module / parameter name / ``path/file.py:LINE``, or None.
        count: how many times the same code was seen at the same place.
        last_step: global step of the latest occurrence.
        value: the measured number behind the alert, when there is one.
    """

    code: str
    severity: Severity
    step: int
    message: str
    hint: str
    where: str | None = None
    count: int = 1
    last_step: int = field(default=-1)
    value: float | None = None

    def __post_init__(self) -> None:
        if self.last_step < 0:
            self.last_step = self.step

    @property
    def key(self) -> tuple[str, str | None]:
        """The de-duplication key: the same code at the same place is one alert."""
        return (self.code, self.where)

    def line(self) -> str:
        """One line for terminals and CI logs: severity, code, step, where, message."""
        where = f" at {self.where}" if self.where else ""
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"{self.severity.upper()} {self.code} step {self.step}{where}: {self.message}{times}"

    def to_dict(self) -> dict[str, Any]:
        """The alert as a plain dict (its record in the report)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        """Build an alert from a report entry; unknown keys are ignored (forward compatibility)."""
        names = cls.__dataclass_fields__.keys()
        missing = [k for k in ("code", "severity", "step", "message", "hint") if k not in data]
        if missing:
            raise ValueError(f"alert record: missing field(s) {', '.join(missing)} in {data!r}.")
        return cls(**{k: v for k, v in data.items() if k in names})


def make_alert(
    code: str,
    step: int,
    message: str,
    *,
    where: str | None = None,
    hint: str | None = None,
    severity: Severity | None = None,
    value: float | None = None,
) -> Alert:
    """An :class:`Alert` with the registry's severity and hint filled in where not given."""
    info = code_info(code)
    return Alert(
        code=code,
        severity=severity or info.severity,
        step=int(step),
        message=message,
        hint=hint or info.hint,
        where=where,
        value=value,
    )


class NumericalHealthError(RuntimeError):
    """Raised inside ``fit`` by ``on_alert="raise"``; ``.alert`` is the alert that triggered it."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(f"{alert.line()} Hint: {alert.hint}")
        self.alert = alert


class AlertBook:
    """Alerts in the order detected, de-duplicated by (code, where), with counts.

    The number of distinct alerts is capped so that a long, sick run cannot grow memory without
    bound; occurrences beyond the cap are counted in :attr:`dropped`.
    """

    def __init__(self, max_distinct: int = 1000) -> None:
        self.max_distinct = max_distinct
        self.alerts: list[Alert] = []
        self._index: dict[tuple[str, str | None], Alert] = {}
        self.dropped = 0

    def record(self, alert: Alert) -> Alert | None:
        """Add an occurrence; returns the alert if it is new, None if it was only counted."""
        known = self._index.get(alert.key)
        if known is not None:
            known.count += alert.count
            known.last_step = max(known.last_step, alert.last_step)
            if alert.value is not None:
                known.value = alert.value
            return None
        if len(self.alerts) >= self.max_distinct:
            self.dropped += 1
            return None
        self.alerts.append(alert)
        self._index[alert.key] = alert
        return alert

    def __len__(self) -> int:
        return len(self.alerts)

    def at_or_above(self, severity: str) -> list[Alert]:
        """The alerts of ``severity`` or worse, in the order detected."""
        rank = severity_rank(severity)
        return [a for a in self.alerts if severity_rank(a.severity) >= rank]

    def state_dict(self) -> dict[str, Any]:
        """The alerts and the count of dropped occurrences, for a checkpoint."""
        return {"alerts": [a.to_dict() for a in self.alerts], "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the alerts and the dropped count with those saved by :meth:`state_dict`."""
        self.alerts, self._index = [], {}
        for data in state.get("alerts", []):
            self.record(Alert.from_dict(data))
        self.dropped = int(state.get("dropped", 0))


@dataclass(frozen=True)
class AlertPolicy:
    """What to do with a new alert: warn, raise :class:`NumericalHealthError`, or stop the run.

    Only alerts at or above ``fail_on`` raise or stop; every alert is recorded and warned about.
    """

    on_alert: OnAlert = "warn"
    fail_on: Severity = "warning"

    def __post_init__(self) -> None:
        if self.on_alert not in ON_ALERT_CHOICES:
            raise ValueError(f"`on_alert`: expected one of 'warn', 'raise', 'stop', got {self.on_alert!r}.")
        check_severity(self.fail_on, "fail_on")

    def escalates(self, alert: Alert) -> bool:
        """Whether this alert must raise or stop the run under this policy."""
        return self.on_alert != "warn" and severity_rank(alert.severity) >= severity_rank(self.fail_on)
