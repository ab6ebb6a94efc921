"""Every TensorBoard tag healthmon writes, in one place.

The monitors write these tags, the offline side (``healthmon check``, the HTML report) reads them
back: both import them from here, so renaming a tag cannot silently empty a chart or hide alerts.
Exact tags are plain strings; a tag with one entry per layer / dtype / group is a :class:`Family`
(``GRAD_LAYER("net.0")`` is ``"healthmon/grad/layer/net.0"``). The comment beside each says when
the value is measured. Pure Python: no torch, no Lightning (the CLI imports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "healthmon/"  # every healthmon tag starts with this


@dataclass(frozen=True)
class Family:
    """Tags sharing a prefix, one per name (layer, dtype, parameter group, eigenvalue index).

    Attributes:
        prefix: the common start of the family's tags, ending in ``/`` or ``_``.
    """

    prefix: str

    def __call__(self, name: object) -> str:
        """The tag of one member: ``prefix + str(name)``."""
        return f"{self.prefix}{name}"

    @property
    def pattern(self) -> str:
        """The custom-scalars regex matching every member."""
        return self.prefix + ".*"

    def member(self, tag: str) -> str | None:
        """The member name of ``tag`` if it belongs to this family, else ``None``."""
        if tag.startswith(self.prefix) and len(tag) > len(self.prefix):
            return tag[len(self.prefix) :]
        return None


# ---- GradientNormMonitor: on logged optimizer steps, in on_before_optimizer_step -----------------
LOSS = "healthmon/loss"  # the loss of the optimizer step (mean over accumulated micro-batches, unscaled)
GRAD_NORM = "healthmon/grad/norm"  # global gradient L2 norm after AMP unscaling, before clipping
GRAD_NORM_CLIPPED = "healthmon/grad/norm_clipped"  # the same after clipping, right before optimizer.step
GRAD_NORM_PRECLIP = "healthmon/grad/norm_preclip"  # HF Trainer clipping itself: its logged pre-clip grad_norm
GRAD_LAYER = Family("healthmon/grad/layer/")  # per-module gradient L2 norm, same step as GRAD_NORM
GRAD_GROUP = Family("healthmon/grad/group/")  # per-parameter-group gradient L2 norm (> 1 group only)
UPDATE_RATIO = Family("healthmon/update_ratio/")  # ||update|| / ||weight|| per module, across optimizer.step

#: Optimizer k > 0 (manual optimisation) writes its tags under this folder: ``.format(k)``.
OPTIMIZER_TEMPLATE = "healthmon/optimizer_{}/"
#: Custom-scalars regex matching every tag of the further optimizers.
OPTIMIZER_PATTERN = r"healthmon/optimizer_\d+/.*"


def optimizer_tag(tag: str, index: int) -> str:
    """The tag ``tag`` (or family prefix) of optimizer ``index``.

    Optimizer 0 keeps the contract tags (``healthmon/loss``, ``healthmon/grad/norm``); optimizer
    k > 0 gets ``healthmon/optimizer_k/loss``, ``healthmon/optimizer_k/grad/norm``, ...
    """
    return tag if index == 0 else OPTIMIZER_TEMPLATE.format(index) + tag.removeprefix(ROOT)


def optimizer_family(family: Family, index: int) -> Family:
    """The family ``family`` of optimizer ``index`` (see :func:`optimizer_tag`)."""
    return Family(optimizer_tag(family.prefix, index))


# ---- GradientUnderflowMonitor: on its cadence, in on_before_optimizer_step (after unscaling) ----
GRAD_PREFIX = "healthmon/grad/"  # every gradient statistic
ZERO_FRACTION_DTYPE = Family("healthmon/grad/zero_fraction/dtype/")  # share of exactly-zero entries
ZERO_FRACTION_LAYER = Family("healthmon/grad/zero_fraction/layer/")  # the same per module
SUBNORMAL_FRACTION_DTYPE = Family("healthmon/grad/subnormal_fraction/dtype/")  # nonzero entries subnormal
SUBNORMAL_FRACTION_LAYER = Family("healthmon/grad/subnormal_fraction/layer/")  # the same per module
FLUSHED_FRACTION_DTYPE = Family("healthmon/grad/flushed_fraction/dtype/")  # estimated flushed to zero
FLUSHED_FRACTION_LAYER = Family("healthmon/grad/flushed_fraction/layer/")  # the same per module
DEAD_UNITS = Family("healthmon/grad/dead_units/")  # ReLU-family units that passed no gradient this batch
GRAD_RMS = Family("healthmon/grad/rms/")  # RMS gradient entry per layer, along depth
GRAD_DEPTH_DECAY = "healthmon/grad/depth_decay_orders"  # RMS decay last -> first layer, in decades
# measured across optimizer.step (step hooks) on the same cadence: sampled weights left unchanged
STALE_FRACTION_DTYPE = Family("healthmon/update/stale_fraction/dtype/")
STALE_FRACTION_LAYER = Family("healthmon/update/stale_fraction/layer/")
GRAD_LOG10_ABS = Family("healthmon/grad/log10_abs/")  # histogram of log10|grad|, histogram_every_n_steps

# ---- NonFiniteMonitor: on logged optimizer steps, only with a GradScaler --------------------------
AMP_LOSS_SCALE = "healthmon/amp/loss_scale"  # the GradScaler's scale used at the step
AMP_SKIPPED_STEPS = "healthmon/amp/skipped_steps"  # optimizer steps the scaler has skipped so far

# ---- LogitsCheck: on its sampled steps, after the training step ------------------------------------
LOGITS = Family("healthmon/logits/")  # every logits statistic
LOGITS_CHECKS = LOGITS("checks")  # loss/softmax-family calls inspected
LOGITS_FINDINGS = LOGITS("findings")  # distinct call sites that fired

# ---- HessianEigenMonitor: on its schedule, in on_train_batch_start (before the step's forward) ---
HESSIAN = Family("healthmon/hessian/")  # every Hessian estimate
HESSIAN_LAMBDA_MAX = HESSIAN("lambda_max")  # top eigenvalue of the loss Hessian on the probe batch
HESSIAN_LAMBDA_MIN = HESSIAN("lambda_min")  # most negative eigenvalue
HESSIAN_LAMBDA = Family(HESSIAN("lambda_"))  # the top-k eigenvalues, lambda_0 ... (top_k > 1)
HESSIAN_TWO_OVER_LR = HESSIAN("two_over_lr")  # 2 / learning rate at that step
HESSIAN_STABILITY_LIMIT = HESSIAN("stability_limit")  # the optimizer's limit (heavy ball: (2 + 2 beta)/lr)
HESSIAN_CONDITION = HESSIAN("condition")  # lambda_max / |lambda_min|
HESSIAN_PRODUCTS = HESSIAN("products")  # Hessian-vector products the estimate used
HESSIAN_SECONDS = HESSIAN("seconds")  # wall time of the estimate
HESSIAN_RESIDUAL = HESSIAN("residual")  # relative residual of the top eigenpairs
HESSIAN_CONVERGED = HESSIAN("converged")  # 1 if every eigenpair converged
HESSIAN_TRACE = HESSIAN("trace")  # Hutchinson estimate of tr(H) (trace_samples > 0)
HESSIAN_CLIP_FACTOR = HESSIAN("clip_factor")  # clipping's scale of a step on the probe (clipping on)
HESSIAN_PRECONDITIONED = HESSIAN("preconditioned_sharpness")  # Adam-type: lambda_max of P^-1 H
HESSIAN_PRECONDITIONED_LIMIT = HESSIAN("preconditioned_limit")  # Adam-type: its stability limit

# ---- the driver: text tags ---------------------------------------------------------------------------
ALERTS_TEXT = "healthmon/alerts"  # one markdown line per alert, when it first fires (TEXT tab)
CONFIG_TEXT = "healthmon/config"  # the monitors' configuration, at step 0
ALERT_RECORDS = "healthmon/alert_records"  # one JSON alert per text event, when it first fires

#: Every exact tag (scalars and text).
ALL_TAGS: frozenset[str] = frozenset(
    {
        LOSS,
        GRAD_NORM,
        GRAD_NORM_CLIPPED,
        GRAD_NORM_PRECLIP,
        GRAD_DEPTH_DECAY,
        AMP_LOSS_SCALE,
        AMP_SKIPPED_STEPS,
        LOGITS_CHECKS,
        LOGITS_FINDINGS,
        HESSIAN_LAMBDA_MAX,
        HESSIAN_LAMBDA_MIN,
        HESSIAN_TWO_OVER_LR,
        HESSIAN_CLIP_FACTOR,
        HESSIAN_STABILITY_LIMIT,
        HESSIAN_CONDITION,
        HESSIAN_PRODUCTS,
        HESSIAN_SECONDS,
        HESSIAN_RESIDUAL,
        HESSIAN_CONVERGED,
        HESSIAN_TRACE,
        HESSIAN_PRECONDITIONED,
        HESSIAN_PRECONDITIONED_LIMIT,
        ALERTS_TEXT,
        CONFIG_TEXT,
        ALERT_RECORDS,
    }
)
#: Every family of per-name tags (one tag per layer, dtype, group or index).
FAMILIES: tuple[Family, ...] = (
    GRAD_LAYER,
    GRAD_GROUP,
    UPDATE_RATIO,
    ZERO_FRACTION_DTYPE,
    ZERO_FRACTION_LAYER,
    SUBNORMAL_FRACTION_DTYPE,
    SUBNORMAL_FRACTION_LAYER,
    FLUSHED_FRACTION_DTYPE,
    FLUSHED_FRACTION_LAYER,
    DEAD_UNITS,
    GRAD_RMS,
    STALE_FRACTION_DTYPE,
    STALE_FRACTION_LAYER,
    GRAD_LOG10_ABS,
    HESSIAN_LAMBDA,
)
#: Folders of exact tags, read as a group by the HTML report (every member is in ``ALL_TAGS``).
GROUPS: tuple[Family, ...] = (LOGITS, HESSIAN)
#: Prefixes that group several tags or families (read by prefix, never written as such).
PREFIXES: frozenset[str] = frozenset({ROOT, GRAD_PREFIX, OPTIMIZER_TEMPLATE})

#: What each chart of the HTML report (:mod:`healthmon.report.charts`) reads, by chart key.
REPORT_CHARTS: dict[str, tuple[str | Family, ...]] = {
    "norm_loss": (GRAD_NORM, GRAD_NORM_CLIPPED, LOSS),
    "layer_norms": (GRAD_LAYER,),
    "update_ratio": (UPDATE_RATIO,),
    "fractions": (
        ZERO_FRACTION_DTYPE,
        ZERO_FRACTION_LAYER,
        SUBNORMAL_FRACTION_DTYPE,
        SUBNORMAL_FRACTION_LAYER,
        FLUSHED_FRACTION_DTYPE,
        FLUSHED_FRACTION_LAYER,
        STALE_FRACTION_DTYPE,
        STALE_FRACTION_LAYER,
        DEAD_UNITS,
    ),
    "hessian": (HESSIAN,),
    "logits": (LOGITS,),
}

_OPTIMIZER = re.compile(r"healthmon/optimizer_([1-9][0-9]*)/(.+)")


def is_known(tag: str) -> bool:
    """Whether ``tag`` is a tag healthmon writes.

    An exact tag, a family member, or either of them under a further optimizer's folder
    (``healthmon/optimizer_k/...``).
    """
    match = _OPTIMIZER.fullmatch(tag)
    if match:
        tag = ROOT + match.group(2)
    return tag in ALL_TAGS or any(f.member(tag) is not None for f in FAMILIES)
