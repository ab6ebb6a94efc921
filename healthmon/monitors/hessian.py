"""HessianEigenMonitor: the top of the loss Hessian's spectrum against the optimizer's stability limit.

Why: gradient descent diverges along the top eigenvector once ``lambda_max > 2/lr`` (heavy-ball
momentum: ``(2 + 2*beta)/lr``), and a clearly negative ``lambda_min`` marks a saddle region
(Goodfellow et al., *Deep Learning*, ch. 4.3). The monitor estimates both from Hessian-vector
products of the module's own ``training_step`` loss on a fixed probe batch; all the mathematics
lives in :mod:`healthmon.numerics` (the Hessian toolkit :mod:`~healthmon.numerics.hessian`, the probe
batch :mod:`~healthmon.numerics.probe`, the estimate's settings and run
:mod:`~healthmon.numerics.estimate_plan` and :mod:`~healthmon.numerics.curvature_estimate`, its
verdicts :mod:`~healthmon.numerics.curvature_findings`); this module holds the Lightning hooks.

When: in ``on_train_batch_start`` of the steps its schedule selects, before that step's forward
pass, on the weights the step is about to update. The estimate runs inside
:func:`~healthmon.engine.isolation.isolated` and replays one RNG state (torch, Python, NumPy)
for every loss evaluation (dropout masks and mixup draws identical across products), so gradients,
BatchNorm statistics, train/eval modes, RNG streams, torchmetrics states and ``self.log``
aggregates are exactly as before: the trained weights are bit-identical with and without
the monitor. The loss is evaluated in float32 outside autocast.

Which parameters: the Hessian is restricted to the parameters whose scale matters. A layer whose
output goes straight into a normalisation (BatchNorm in training mode, GroupNorm, LayerNorm, ...)
is scale-invariant: its curvature grows as ``1/||w||^2`` for small weights, and a large step along
it only grows ``||w||`` (the effective learning rate ``lr/||w||^2`` falls by itself), so it says
nothing about divergence. Those layers are found once, at the first estimate, by one forward pass
of the probe (:mod:`~healthmon.numerics.scale_invariance`) and left out (named in the message).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from healthmon import _checks, tags
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.isolation import HostRandomState, isolated
from healthmon.engine.run import Run
from healthmon.monitors.base import Monitor
from healthmon.numerics.curvature_estimate import (
    ESTIMATE_ERRORS,
    CurvatureEstimate,
    WarmStart,
    estimate_curvature,
    failure_reason,
)
from healthmon.numerics.curvature_findings import SKIPPED, judge_curvature, spectrum_values
from healthmon.numerics.estimate_plan import (
    EstimatePlan,
    plan_estimate,
    select_hvp_method,
    solver_memory_factor,
)
from healthmon.numerics.hvp import HVP_METHODS, HessianOperator, HVPMethod, mean_over_ranks
from healthmon.numerics.probe import ProbeBatch
from healthmon.numerics.scale_invariance import scale_invariant_parameters
from healthmon.numerics.spectrum import SpectrumEstimate
from healthmon.numerics.stability import clip_factor
from healthmon.schedules import BudgetClock, LogSpacedSteps, LogThenEvery, log_then_every

__all__ = ["BudgetClock", "HessianEigenMonitor", "LogThenEvery", "log_then_every"]

#: The default schedule's early estimates: steps 0, 1, 4 and 16 (log-spaced, below this step).
EARLY_UNTIL = 20

TAG = tags.HESSIAN.prefix
TAG_LAMBDA_MAX = TAG + "lambda_max"
TAG_LAMBDA_MIN = TAG + "lambda_min"
TAG_TWO_OVER_LR = TAG + "two_over_lr"
TAG_LIMIT = TAG + "stability_limit"
TAG_CONDITION = TAG + "condition"
TAG_PRODUCTS = TAG + "products"
TAG_SECONDS = TAG + "seconds"
TAG_RESIDUAL = TAG + "residual"
TAG_CONVERGED = TAG + "converged"
TAG_TRACE = TAG + "trace"
TAG_PRECOND = TAG + "preconditioned_sharpness"
TAG_PRECOND_LIMIT = TAG + "preconditioned_limit"


def _clone(batch: Any, device: torch.device) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone().to(device))


class HessianEigenMonitor(Monitor):
    """Top Hessian eigenvalues (sharpness), negative curvature and their stability limits.

    On each scheduled step the monitor builds Hessian-vector products of ``training_step``'s
    loss on the probe batch, estimates ``lambda_1..k`` and ``lambda_min`` (warm-started from the
    previous estimate's eigenvectors), and compares ``lambda_max`` with the optimizer's
    stability limit, read from the first optimizer at that moment (learning-rate schedules
    included). Under DDP each rank uses its own probe shard and products are averaged across
    ranks (every rank gets the same eigenvalues; rank zero logs). The driver plans the steps an
    estimate may be due on (:meth:`needs_step`) with its checked steps; no other step calls it.

    Alerts:
        ``hessian.sharpness``: SGD-type: ``lambda_max > 2/lr`` (momentum: ``(2 + 2 beta)/lr``);
        Adam-type: the preconditioned sharpness ``lambda_max(P^-1 H)`` above
        ``(2 + 2 beta1)/((1 - beta1) lr)``; the Hessian of the parameters whose scale matters
        (scale-invariant ones left out, see the module docstring). A Ritz value is a lower bound on the true
        ``lambda_max``, so the alert is sound even when the estimate has not converged.
        ``hessian.negative_curvature``: ``lambda_min < 0`` and ``|lambda_min| >=
        negative_ratio * lambda_max`` (top estimate converged).
        ``monitor.skipped``: manual optimization, no differentiable loss, or an unknown
        optimizer type for the sharpness test.

    Args:
        every_n_steps: schedule: an int, a callable ``step -> bool`` (e.g.
            :func:`log_then_every` for estimates from step 0, log-spaced), or None (default):
            step 0 always (before the first update), the early steps 1, 4 and 16 while they fit
            ``early_budget``, then a time budget: all estimates after step 0 take at most
            ``budget`` of the training wall time.
        budget: with ``every_n_steps=None``, the share of training time the estimates after
            step 0 may take, counted cumulatively (set-up, method choice and early estimates
            included). The next estimate's step is computed from the measured step time and the
            last estimate's cost, so the schedule is in steps and every DDP rank agrees on it.
        top_k: how many of the largest eigenvalues.
        solver: "lanczos" (default, fewest products) or "power" (block power iteration; the
            most negative eigenvalue by power iteration on ``H - lambda_max I``).
        hvp: "auto" (time both methods once and keep the faster), "double_backward" or
            "forward_over_reverse".
        tol: relative residual ``||H v - lambda v|| / |lambda|`` to stop at (eigenvalue error is
            about ``tol^2`` relative for a well-separated eigenvalue).
        max_products: cap on Hessian-vector products per solve.
        negative_curvature: also estimate ``lambda_min``.
        negative_ratio: ``|lambda_min| / lambda_max`` at or above which negative curvature is
            significant (the residual of ``lambda_min`` is measured against this scale).
        trace_samples: Hutchinson samples for ``tr(H)`` (0: off).
        preconditioned: for Adam-type optimizers, estimate the preconditioned sharpness.
        warm_start: start each estimate from the previous eigenvectors (mixed with a random
            component, so that a new top direction is still found after an eigenvalue crossing).
        early_tol: default schedule: the tolerance of the estimates before step 20 (step 0
            and the early ones); later estimates use ``tol``.
        negative_every: default schedule: ``lambda_min`` on every n-th estimate after step 20.
        early_budget: default schedule: an early estimate (steps 1, 4, 16) runs only while all
            estimates after step 0, this one included at the last one's cost, fit this share of
            the planned run's training time (a big model on a short run gets its step-0 estimate
            and then the time budget's).
        max_memory_factor: the eigensolvers' vectors stay within this multiple of the parameter
            memory (thick-restarted Lanczos with a basis that fits; the top and bottom solves run
            one after the other). Raised to the smallest workable value when lower (a basis of
            ``top_k + 1`` vectors: 6 for float32 and ``top_k=1``, 12 for bf16, whose basis is float32).
        probe_batch: the batch to measure on (any structure ``training_step`` accepts); None
            captures the first optimizer step's batch: all its accumulated micro-batches, the
            loss that step descends (the step-0 estimate waits for its last micro-batch, still
            before the first update). The top eigenvalue of a smaller sample overstates the
            curvature, and it is the step's own batch whose curvature decides whether SGD's
            steps are stable.
        probe_chunk_size: split the probe batch into chunks of at most this many rows and sum
            the weighted products (memory); requires a mean-reduced loss.
        seed: seed of the random start vectors (the global RNG is not used).
        on_alert: see :class:`~healthmon.monitors.base.Monitor`.
        fail_on: see :class:`~healthmon.monitors.base.Monitor`.
        log_every_n_steps: unused for the estimates (every estimate is logged); kept for the
            common signature.
    """

    #: Steps that may estimate are planned by the driver (:meth:`needs_step`): none of its points
    #: is called on other steps.
    unchecked_points = frozenset()

    def __init__(
        self,
        *,
        every_n_steps: Cadence | None = None,
        budget: float = 0.02,
        top_k: int = 1,
        solver: Literal["lanczos", "power"] = "lanczos",
        hvp: Literal["auto", "double_backward", "forward_over_reverse", "finite_differences"] = "auto",
        tol: float = 1e-3,
        early_tol: float = 0.1,
        max_products: int = 100,
        negative_curvature: bool = True,
        negative_ratio: float = 0.1,
        negative_every: int = 4,
        early_budget: float = 0.1,
        trace_samples: int = 0,
        preconditioned: bool = True,
        warm_start: bool = True,
        max_memory_factor: float = 10.0,
        probe_batch: Any = None,
        probe_chunk_size: int | None = None,
        seed: int = 0,
        on_alert: OnAlert = "warn",
        fail_on: Severity = "warning",
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=1 if every_n_steps is None else every_n_steps,
            on_alert=on_alert,
            fail_on=fail_on,
            log_every_n_steps=log_every_n_steps,
        )
        self.budgeted = every_n_steps is None
        self.budget = _checks.fraction(budget, "budget")
        self._early = LogSpacedSteps(4, until=EARLY_UNTIL)
        self.top_k = _checks.positive_int(top_k, "top_k")
        self.solver = _checks.choice(solver, "solver", ("lanczos", "power"))
        self.hvp = _checks.choice(hvp, "hvp", ("auto", *HVP_METHODS))
        self.tol = _checks.open_fraction(tol, "tol")
        self.early_tol = _checks.open_fraction(early_tol, "early_tol")
        self.negative_every = _checks.positive_int(negative_every, "negative_every")
        self.early_budget = _checks.fraction(early_budget, "early_budget")
        self.max_products = _checks.positive_int(max_products, "max_products", minimum=self.top_k)
        self._clock = BudgetClock(self.budget, negative_products=self.max_products)
        self.negative_curvature = _checks.boolean(negative_curvature, "negative_curvature")
        self.preconditioned = _checks.boolean(preconditioned, "preconditioned")
        self.warm_start = _checks.boolean(warm_start, "warm_start")
        self.negative_ratio = _checks.fraction(negative_ratio, "negative_ratio")
        self.trace_samples = _checks.non_negative_int(trace_samples, "trace_samples")
        self.probe_chunk_size = _checks.optional_positive_int(probe_chunk_size, "probe_chunk_size")
        self.seed = _checks.non_negative_int(seed, "seed")
        self.max_memory_factor = _checks.positive_float(max_memory_factor, "max_memory_factor")
        self._user_probe = probe_batch
        self._probe = ProbeBatch()  # copies on the device
        self._last_step = -1
        self._quiet_until = 0  # no estimate can be due before this step
        self._method: HVPMethod | None = None if hvp == "auto" else hvp
        self._warm = WarmStart()
        self._generator = torch.Generator().manual_seed(self.seed)
        self.last_estimate: SpectrumEstimate | None = None
        self.estimates = 0
        # found at the first estimate: the scale-invariant parameters' names, and the rest (None: all)
        self.scale_invariant: list[str] | None = None
        self._params: list[str] | None = None

    @override
    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "every_n_steps": f"time budget {self.budget:.0%}"
            if self.budgeted
            else super().config()["every_n_steps"],
            "budget": self.budget if self.budgeted else None,
            "top_k": self.top_k,
            "solver": self.solver,
            "hvp": self.hvp,
            "tol": self.tol,
            "early_tol": self.early_tol if self.budgeted else None,
            "negative_every": self.negative_every if self.budgeted else None,
            "early_budget": self.early_budget if self.budgeted else None,
            "max_products": self.max_products,
            "negative_curvature": self.negative_curvature,
            "negative_ratio": self.negative_ratio,
            "trace_samples": self.trace_samples,
            "preconditioned": self.preconditioned,
            "warm_start": self.warm_start,
            "max_memory_factor": self.max_memory_factor,
            "probe_chunk_size": self.probe_chunk_size,
        }

    @override
    def declare_layout(self, driver: Driver) -> None:
        driver.declare_layout(
            "healthmon: curvature",
            {
                "sharpness vs stability limit": [TAG_LAMBDA_MAX, TAG_LIMIT, TAG_TWO_OVER_LR],
                "extremes": [TAG_LAMBDA_MAX, TAG_LAMBDA_MIN],
                "cost": [TAG_PRODUCTS, TAG_SECONDS],
            },
        )

    # ---- hooks ---------------------------------------------------------------------------------
    @override
    def on_start(self, run: Run) -> None:
        # the interval agreement of the budget clock under DDP: the largest proposal wins
        self._clock.agree = run.max_over_ranks
        self._clock.total_steps = float(run.total_steps)
        self._quiet_until = 0  # a new fit: look again from its first step

    @override
    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        step = run.global_step
        if step < self._quiet_until:
            return  # nothing can be due before then (the clock times the gap as a whole)
        if not self._take_probe(run, batch, batch_idx):
            return  # the probe is the first optimizer step's whole batch: wait for the rest
        if step == self._last_step:
            return  # gradient accumulation: one estimate per optimizer step
        self._last_step = step
        if self._due(run, step):
            blocker = run.replay_blocker()
            if blocker is not None:
                self._skip(run, blocker)
            else:
                self._estimate(run)
        self._quiet_until = self._next_possible(step)

    @override
    def needs_step(self, step: int) -> bool:
        return step >= self._quiet_until if self.budgeted else self.due_at(step)

    @override
    def next_needed(self, step: int) -> int | None:
        return max(self._quiet_until, step + 1) if self.budgeted else self.next_due(step)

    def _next_possible(self, step: int) -> int:
        """The first step after ``step`` at which the default schedule may estimate."""
        clock = self._clock
        if not self.budgeted or clock.next_step is None:
            return step + 1  # a cadence of the user's, or the clock is still calibrating
        early = next((s for s in self._early.steps() if s > step), clock.next_step)
        return max(step + 1, min(clock.next_step, early))

    @property
    def _probe_rows(self) -> int:
        return self._probe.rows

    def _take_probe(self, run: Run, batch: Any, batch_idx: int) -> bool:
        """Copy the user's probe once, or this micro-batch while the probe is incomplete.

        Returns:
            Whether the probe is complete.
        """
        if self._user_probe is not None:
            if not self._probe.parts:
                self._probe.add(_clone(self._user_probe, run.root_device), 0)
            return True
        if not self._probe.complete:
            self._probe.add(_clone(batch, run.root_device), batch_idx)
            accumulate = run.accumulate_grad_batches
            return self._probe.close_after(accumulate, run.batches_per_epoch)
        return True

    def _due(self, run: Run, step: int) -> bool:
        if not self.budgeted:
            return self.should_run(run)
        clock = self._clock
        due = clock.due(step)  # always called: it times the training steps
        if due or step == 0:
            return True
        if not self._early(step):
            return False
        # every rank must agree (the products are averaged over ranks): one refusal refuses all
        refused = not clock.early_affordable(self.early_budget)
        return clock.agree(int(refused)) == 0

    # ---- the estimate ---------------------------------------------------------------------------
    def _operator(self, run: Run, method: HVPMethod, *, restricted: bool = True) -> HessianOperator:
        # Each probe batch weighs by its share of the rows: the products are those of the mean loss
        # over all probe samples (mean-reduced losses). NumPy/Python draws are replayed like torch's.
        host_rng = HostRandomState(run.model)
        losses = self._probe.losses(run.loss_on, self.probe_chunk_size, before=host_rng.restore)
        return HessianOperator(
            run.model,
            losses,
            params=self._params if restricted else None,
            method=method,
            reduce=mean_over_ranks,
            cache_graph=len(losses) == 1,
        )

    def _find_scale_invariant(self, run: Run) -> None:
        """Leave the scale-invariant parameters out of the operator (once, at the first estimate).

        See "Which parameters" in the module docstring: one forward pass of the probe, inside
        :func:`isolated`, finds them (:mod:`~healthmon.numerics.scale_invariance`).
        """
        host_rng = HostRandomState(run.model)
        loss_fn = self._probe.losses(run.loss_on, self.probe_chunk_size, before=host_rng.restore)[0][0]
        invariant = scale_invariant_parameters(run.model, loss_fn)  # with gradients: loss_of wants them
        trainable = [name for name, p in run.model.named_parameters() if p.requires_grad]
        kept = [name for name in trainable if name not in invariant]
        self.scale_invariant = sorted(name for name in trainable if name in invariant)
        self._params = kept if kept and len(kept) < len(trainable) else None

    def _estimate(self, run: Run) -> None:
        started = time.perf_counter()
        optimizer = run.optimizers[0] if run.optimizers else None
        if optimizer is None or not any(p.requires_grad for p in run.model.parameters()):
            self._skip(run, "no optimizer or no trainable parameter: there is no loss Hessian to watch")
            return
        try:
            with isolated(run.model), torch.enable_grad():
                if self.scale_invariant is None:
                    self._find_scale_invariant(run)
                if self._method is None:
                    self._method = select_hvp_method(
                        lambda m: self._operator(run, m), self.tol, self._generator
                    )
                plan = self._plan(run.global_step, self.estimates)
                op = self._operator(run, self._method)
                warm = (self._warm.top, self._warm.bottom, self._warm.precond)
                if any(v is not None and v.shape[0] != op.n for v in warm):
                    self._warm = WarmStart()  # a checkpoint's vectors over another parameter set
                result = estimate_curvature(
                    op,
                    optimizer,
                    plan,
                    top_k=self.top_k,
                    solver=self.solver,  # type: ignore[arg-type]  # validated by _checks.choice
                    max_products=self.max_products,
                    negative_ratio=self.negative_ratio,
                    trace_samples=self.trace_samples,
                    max_memory_factor=solver_memory_factor(op.dtype, self.top_k, self.max_memory_factor),
                    preconditioned_sharpness=self.preconditioned,
                    warm=self._warm if self.warm_start else None,
                    generator=self._generator,
                )
                # clipping scales the step the estimate is about: measure by how much, on the probe
                clip = clip_factor(self._gradient_norm(run, op), run.clip_norm) if run.clip_norm else 1.0
                op.release()
        except ESTIMATE_ERRORS as err:  # NaN/Inf: NonFiniteMonitor reports the cause
            self._skip(run, failure_reason(err))
            return
        self.estimates += 1
        self.last_estimate = result.spectrum
        if self.budgeted:  # all of it: finding the parameters and the product method too
            # the next estimate the clock schedules comes after the early ones
            following = self._plan(max(run.global_step + 1, self._early.until), self.estimates)
            self._clock.spent(
                run.global_step,
                time.perf_counter() - started,
                products=result.products,
                negative=plan.negative,
                next_negative=following.negative,
            )
        self._warm.keep(result.spectrum, result.pre)
        self._report(run, result, clip)

    def _plan(self, step: int, estimates_done: int) -> EstimatePlan:
        """The tolerance and ``lambda_min`` switch of an estimate at ``step`` (see :func:`plan_estimate`)."""
        return plan_estimate(
            step,
            budgeted=self.budgeted,
            early_until=self._early.until,
            estimates_done=estimates_done,
            tol=self.tol,
            early_tol=self.early_tol,
            negative_curvature=self.negative_curvature,
            negative_every=self.negative_every,
        )

    def _gradient_norm(self, run: Run, op: HessianOperator) -> float:
        """The whole probe gradient's norm (clipping scales by it), also when ``op`` is restricted."""
        if self._params is None:
            return op.gradient_norm()
        assert self._method is not None
        return self._operator(run, self._method, restricted=False).gradient_norm()

    def _report(self, run: Run, result: CurvatureEstimate, clip: float) -> None:
        values = spectrum_values(result.spectrum, result.limit, result.pre, result.products)
        if run.clip_norm:
            values["clip_factor"] = clip
        self.driver.log(run, {TAG + name: v for name, v in values.items()}, run.global_step)
        self._judge(run, result, clip)

    def _judge(self, run: Run, result: CurvatureEstimate, clip: float) -> None:
        for found in judge_curvature(
            result.spectrum,
            result.limit,
            result.pre,
            preconditioned=self.preconditioned,
            negative_ratio=self.negative_ratio,
            probe_rows=self._probe.rows,
            clip=clip,
            left_out=len(self.scale_invariant or ()) if self._params is not None else 0,
        ):
            if found.code == SKIPPED:
                self._skip(run, found.message)
            else:
                self.driver.report(run, found)

    def _skip(self, run: Run, reason: str) -> None:
        self.driver.alert(
            run, "monitor.skipped", f"HessianEigenMonitor: {reason}.", where="HessianEigenMonitor"
        )

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def monitor_state(self) -> dict[str, Any]:
        return {
            "hvp_method": self._method,
            **self._warm.state(),
            "estimates": self.estimates,
            "generator": self._generator.get_state(),
            "clock": self._clock.state(),
        }

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        if self.hvp == "auto" and state.get("hvp_method") is not None:
            self._method = state["hvp_method"]
        self._warm.load(state)
        self.estimates = int(state.get("estimates", 0))
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])
        if state.get("clock") is not None:
            self._clock.load(state["clock"])
