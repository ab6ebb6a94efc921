"""HessianEigenMonitor: the top of the loss Hessian's spectrum against the optimizer's stability limit.

Why: gradient descent diverges along the top eigenvector once ``lambda_max > 2/lr`` (heavy-ball
momentum: ``(2 + 2*beta)/lr``), and a clearly negative ``lambda_min`` marks a saddle region
(Goodfellow et al., *Deep Learning*, ch. 4.3). The monitor estimates both from Hessian-vector
products of the module's own ``training_step`` loss on a fixed probe batch; all the mathematics
lives in :mod:`healthmon.numerics.hessian`.

When: in ``on_train_batch_start`` of the steps its schedule selects, before that step's forward
pass, on the weights the step is about to update. The estimate runs inside
:func:`~healthmon.engine.isolation.isolated` and replays one RNG state (torch, Python, NumPy)
for every loss evaluation (dropout masks and mixup draws identical across products), so gradients,
BatchNorm statistics, train/eval modes, RNG streams, torchmetrics states and ``self.log``
aggregates are exactly as before: the trained weights are bit-identical with and without
the monitor. The loss is evaluated in float32 outside autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from healthmon import _checks
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.isolation import HostRandomState, isolated
from healthmon.engine.run import Run
from healthmon.monitors.base import Monitor
from healthmon.numerics.batches import batch_size
from healthmon.numerics.eigensolvers import vector_ratio
from healthmon.numerics.hessian import (
    HVP_METHODS,
    HessianOperator,
    HVPMethod,
    SpectrumEstimate,
    adam_preconditioner,
    choose_hvp_method,
    estimate_spectrum,
    lanczos,
    mean_over_ranks,
    minimum_memory_factor,
    preconditioned,
    split_batch,
    stability_limit,
)
from healthmon.numerics.hvp import FD_AGREEMENT
from healthmon.schedules import BudgetClock, LogSpacedSteps, LogThenEvery, log_then_every

__all__ = ["BudgetClock", "HessianEigenMonitor", "LogThenEvery", "log_then_every"]

TAG = "healthmon/hessian/"
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


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _clone(batch: Any, device: torch.device) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone().to(device))


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise TypeError(
            "training_step did not return a differentiable loss (a Tensor or a dict with 'loss')."
        )
    return loss


class HessianEigenMonitor(Monitor):
    """Top Hessian eigenvalues (sharpness), negative curvature and their stability limits.

    On each scheduled step the monitor builds Hessian-vector products of ``training_step``'s
    loss on the probe batch, estimates ``lambda_1..k`` and ``lambda_min`` (warm-started from the
    previous estimate's eigenvectors), and compares ``lambda_max`` with the optimizer's
    stability limit, read from the first optimizer at that moment (learning-rate schedules
    included). Under DDP each rank uses its own probe shard and products are averaged across
    ranks (every rank gets the same eigenvalues; rank zero logs).

    Alerts:
        ``hessian.sharpness``: SGD-type: ``lambda_max > 2/lr`` (momentum: ``(2 + 2 beta)/lr``);
        Adam-type: the preconditioned sharpness ``lambda_max(P^-1 H)`` above
        ``(2 + 2 beta1)/((1 - beta1) lr)``. A Ritz value is a lower bound on the true
        ``lambda_max``, so the alert is sound even when the estimate has not converged.
        ``hessian.negative_curvature``: ``lambda_min < 0`` and ``|lambda_min| >=
        negative_ratio * lambda_max`` (top estimate converged).
        ``monitor.skipped``: manual optimization, no differentiable loss, or an unknown
        optimizer type for the sharpness test.

    Args:
        every_n_steps: schedule: an int, a callable ``step -> bool`` (e.g.
            :func:`log_then_every` for estimates from step 0, log-spaced), or None (default) for
            a time budget: estimates take at most ``budget`` of the training wall time.
        budget: with ``every_n_steps=None``, the share of training time estimates may take.
            The next estimate's step is computed from the measured step time and the last
            estimate's cost, so the schedule is in steps and every DDP rank agrees on it. The
            first estimate comes after 10 calibration steps when the planned run can afford a
            cold estimate (~150 step-times) within the budget, else once elapsed time does.
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
        early_tol: default schedule: the tolerance of the estimates before step 1000 (step 0
            and the log-spaced ones); later estimates use ``tol``.
        negative_every: default schedule: ``lambda_min`` on every n-th estimate after step 1000.
        early_budget: default schedule: a log-spaced estimate after step 0 runs only when the
            previous estimate cost at most this share of the planned run's training time.
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

    def __init__(
        self,
        *,
        every_n_steps: Cadence | None = None,
        budget: float = 0.02,
        top_k: int = 1,
        solver: Literal["lanczos", "power"] = "lanczos",
        hvp: Literal["auto", "double_backward", "forward_over_reverse", "finite_differences"] = "auto",
        tol: float = 1e-3,
        early_tol: float = 5e-2,
        max_products: int = 100,
        negative_curvature: bool = True,
        negative_ratio: float = 0.1,
        negative_every: int = 4,
        early_budget: float = 0.25,
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
        self._clock = BudgetClock(self.budget)
        self._early = LogSpacedSteps(4, until=1000)
        self.top_k = _checks.positive_int(top_k, "top_k")
        self.solver = _checks.choice(solver, "solver", ("lanczos", "power"))
        self.hvp = _checks.choice(hvp, "hvp", ("auto", *HVP_METHODS))
        self.tol = _checks.positive_float(tol, "tol")
        if self.tol >= 1:
            raise ValueError(f"`tol`: expected a number in (0, 1), got {tol!r}.")
        self.early_tol = _checks.positive_float(early_tol, "early_tol")
        if self.early_tol >= 1:
            raise ValueError(f"`early_tol`: expected a number in (0, 1), got {early_tol!r}.")
        self.negative_every = _checks.positive_int(negative_every, "negative_every")
        self.early_budget = _checks.fraction(early_budget, "early_budget")
        self.max_products = _checks.positive_int(max_products, "max_products", minimum=self.top_k)
        for name, flag in (
            ("negative_curvature", negative_curvature),
            ("preconditioned", preconditioned),
            ("warm_start", warm_start),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}`: expected True or False, got {flag!r}.")
        self.negative_curvature = negative_curvature
        self.negative_ratio = _checks.fraction(negative_ratio, "negative_ratio")
        self.trace_samples = _checks.non_negative_int(trace_samples, "trace_samples")
        self.preconditioned = preconditioned
        self.warm_start = warm_start
        if probe_chunk_size is not None:
            _checks.positive_int(probe_chunk_size, "probe_chunk_size")
        self.probe_chunk_size = probe_chunk_size
        self.seed = _checks.non_negative_int(seed, "seed")
        self.max_memory_factor = _checks.positive_float(max_memory_factor, "max_memory_factor")
        self._user_probe = probe_batch
        self._probes: list[tuple[Any, int, int]] = []  # (batch, batch_idx, rows) on the device
        self._probe_rows = 0
        self._probe_complete = False
        self._last_step = -1
        self._method: HVPMethod | None = None if hvp == "auto" else hvp  # type: ignore[assignment]
        self._warm_top: Tensor | None = None
        self._warm_bottom: Tensor | None = None
        self._warm_precond: Tensor | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self.last_estimate: SpectrumEstimate | None = None
        self.estimates = 0

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
    def declare_layout(self, hub: Driver) -> None:
        hub.declare_layout(
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
        self._clock.agree = run.max_over_ranks
        self._clock.total_steps = float(run.total_steps)

    @override
    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        step = run.global_step
        if self._user_probe is not None:
            if not self._probes:
                self._add_probe(self._user_probe, 0, run.model)
        elif not self._probe_complete:
            self._add_probe(batch, batch_idx, run.model)
            micro_batches = run.accumulate_grad_batches
            available = run.batches_per_epoch
            self._probe_complete = len(self._probes) >= min(micro_batches, available)
            if not self._probe_complete:
                return  # the probe is the first optimizer step's whole batch: wait for the rest
        if step == self._last_step:
            return  # gradient accumulation: one estimate per optimizer step
        self._last_step = step
        if self.budgeted:
            due = self._clock.due(step)  # always called: it times the training steps
            due = due or (self._early(step) and self._early_affordable(step))
        else:
            due = self.should_run(run)
        if not due:
            return
        blocker = run.replay_blocker()
        if blocker is not None:
            self._skip(run, blocker)
            return
        self._estimate(run)

    def _add_probe(self, batch: Any, batch_idx: int, model: torch.nn.Module) -> None:
        """Keep a copy of a (micro-)batch as part of the probe, weighted by its rows (1 if unknown)."""
        rows = batch_size(batch) or 1
        self._probes.append((_clone(batch, _device_of(model)), batch_idx, rows))
        self._probe_rows += rows

    def _early_affordable(self, step: int) -> bool:
        """Step 0 always; a later log-spaced estimate when the last one cost at most ``early_budget``
        of the planned run's training time (a big model on a short run gets its step-0 estimate and
        then the time budget's)."""
        clock = self._clock
        if step == 0 or clock.last_cost is None or not math.isfinite(clock.total_steps):
            return True
        planned = clock.seconds_per_step * clock.total_steps
        return clock.last_cost <= self.early_budget * planned

    # ---- the estimate ---------------------------------------------------------------------------
    def _operator(self, run: Run, method: HVPMethod) -> HessianOperator:
        # Each probe batch weighs by its share of the rows: the products are those of the mean loss
        # over all probe samples (mean-reduced losses).
        chunks = [
            (chunk, idx, weight * rows / self._probe_rows)
            for probe, idx, rows in self._probes
            for chunk, weight in split_batch(probe, self.probe_chunk_size)
        ]
        host_rng = HostRandomState(run.model)  # NumPy/Python draws replayed like torch's (one function)

        def closure(chunk: Any, idx: int) -> Callable[[], Tensor]:
            def loss() -> Tensor:
                host_rng.restore()
                return _loss_of(run.loss_on(chunk, idx))

            return loss

        return HessianOperator(
            run.model,
            [(closure(c, idx), w) for c, idx, w in chunks],
            method=method,
            reduce=mean_over_ranks,
            cache_graph=len(chunks) == 1,
        )

    def _estimate(self, run: Run) -> None:
        optimizer = run.optimizers[0] if run.optimizers else None
        if optimizer is None or not any(p.requires_grad for p in run.model.parameters()):
            self._skip(run, "no optimizer or no trainable parameter: there is no loss Hessian to watch")
            return
        try:
            with isolated(run.model), torch.enable_grad():
                if self._method is None:
                    # finite differences only where their error is well below the tolerance asked
                    # for: an operator less accurate than that could never honestly converge
                    self._method = choose_hvp_method(
                        lambda m: self._operator(run, m),
                        rtol=min(FD_AGREEMENT, 0.1 * self.tol),
                        generator=self._generator,
                    )
                step = run.global_step
                early = self.budgeted and step < self._early.until
                tol = self.early_tol if early else self.tol
                negative = self.negative_curvature and (
                    not self.budgeted or (not early and (self.estimates + 1) % self.negative_every == 0)
                )
                op = self._operator(run, self._method)  # type: ignore[arg-type]
                memory = max(
                    self.max_memory_factor,
                    minimum_memory_factor(op.dtype, self.top_k) + self.top_k * vector_ratio(op.dtype),
                )
                est = estimate_spectrum(
                    op,
                    k=self.top_k,
                    solver=self.solver,  # type: ignore[arg-type]
                    tol=tol,
                    max_products=self.max_products,
                    negative=negative,
                    negative_scale=self.negative_ratio,
                    trace_samples=self.trace_samples,
                    warm_top=self._warm_top if self.warm_start else None,
                    warm_bottom=self._warm_bottom if self.warm_start else None,
                    max_memory_factor=memory,
                    generator=self._generator,
                )
                limit = stability_limit(optimizer) if optimizer is not None else None
                pre = None
                if limit is not None and limit.kind == "adam" and self.preconditioned:
                    p = adam_preconditioner(optimizer, op.params)  # type: ignore[arg-type]
                    if p is not None:
                        pre = lanczos(
                            preconditioned(op, p),
                            k=1,
                            v0=self._warm_precond if self.warm_start else None,
                            tol=tol,
                            max_products=self.max_products,
                            max_memory_factor=memory,
                            generator=self._generator,
                        )
                op.release()
        except TypeError as err:
            self._skip(run, str(err))
            return
        except (FloatingPointError, torch.linalg.LinAlgError) as err:
            # NaN/Inf weights or probe batch: NonFiniteMonitor reports the cause; no estimate here
            self._skip(run, f"no estimate: {err}")
            return
        except RuntimeError as err:  # a model autograd cannot differentiate twice (custom kernels...)
            self._skip(run, f"no estimate, the loss cannot be differentiated twice ({err})")
            return
        self.estimates += 1
        self.last_estimate = est
        if self.budgeted:
            self._clock.spent(run.global_step, est.seconds)
        self._warm_top = est.top.eigenvectors.detach()
        self._warm_bottom = None if est.bottom is None else est.bottom.eigenvectors.detach()
        self._warm_precond = None if pre is None else pre.eigenvectors.detach()
        products = est.num_products + (pre.num_products if pre is not None else 0)
        self._report(run, est, limit, pre, products)

    def _report(
        self, run: Run, est: SpectrumEstimate, limit: Any, pre: Any, products: int
    ) -> None:
        hub = self.hub
        lam = est.lambda_max
        values: dict[str, float] = {TAG_LAMBDA_MAX: lam, TAG_PRODUCTS: products, TAG_SECONDS: est.seconds}
        for i, v in enumerate(est.top.eigenvalues, start=1):
            values[f"{TAG}lambda_{i}"] = v
        values[TAG_RESIDUAL] = max(est.top.residuals)
        values[TAG_CONVERGED] = float(est.top.all_converged)
        low = est.lambda_min
        if low is not None:
            values[TAG_LAMBDA_MIN] = low
            if est.condition is not None and math.isfinite(est.condition):
                values[TAG_CONDITION] = est.condition
        if est.trace is not None:
            values[TAG_TRACE] = est.trace.trace
        if limit is not None:
            values[TAG_TWO_OVER_LR] = limit.two_over_lr
            if math.isfinite(limit.limit):
                values[TAG_PRECOND_LIMIT if limit.kind == "adam" else TAG_LIMIT] = limit.limit
        if pre is not None:
            values[TAG_PRECOND] = pre.eigenvalues[0]
        hub.log(run, values, run.global_step)
        self._judge(run, est, limit, pre)

    def _judge(self, run: Run, est: SpectrumEstimate, limit: Any, pre: Any) -> None:
        hub = self.hub
        lam = est.lambda_max
        if limit is None or limit.kind == "unknown":
            self._skip(run, "sharpness: no known stability limit for this optimizer")
        elif limit.kind == "sgd" and lam > limit.limit:
            hub.alert(
                run,
                "hessian.sharpness",
                f"The top Hessian eigenvalue lambda_max = {lam:.4g} is above the stability limit "
                f"{limit.limit:.4g} ({limit.formula}, lr={limit.lr:.3g}, 2/lr = {limit.two_over_lr:.4g}) "
                f"on a probe of {self._probe_rows} samples: gradient descent oscillates and diverges "
                "along its eigenvector.",
                hint=f"Lower the learning rate below {limit.lr * limit.limit / lam:.3g} (where the limit "
                "meets lambda_max), or add warm-up.",
                value=lam,
            )
        elif limit.kind == "adam" and pre is not None and pre.eigenvalues[0] > limit.limit:
            ps = pre.eigenvalues[0]
            hub.alert(
                run,
                "hessian.sharpness",
                f"The preconditioned sharpness lambda_max(P^-1 H) = {ps:.4g} is above Adam's stability "
                f"limit {limit.limit:.4g} ({limit.formula}, lr={limit.lr:.3g}).",
                hint="Lower the learning rate, add warm-up, or raise Adam's eps.",
                value=ps,
            )
        elif limit.kind == "adam" and not self.preconditioned:
            self._skip(run, "sharpness: Adam-type optimizer and preconditioned=False")
        low = est.lambda_min
        if (
            low is not None
            and low < 0
            and lam > 0
            and est.top.all_converged
            and -low >= self.negative_ratio * lam
        ):
            hub.alert(
                run,
                "hessian.negative_curvature",
                f"The Hessian has a negative eigenvalue {low:.4g}, {-low / lam:.2g} of lambda_max "
                f"{lam:.4g}: the weights are near a saddle point.",
                value=low,
            )

    def _skip(self, run: Run, reason: str) -> None:
        self.hub.alert(
            run, "monitor.skipped", f"HessianEigenMonitor: {reason}.", where="HessianEigenMonitor"
        )

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def monitor_state(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        return {
            "hvp_method": self._method,
            "warm_top": cpu(self._warm_top),
            "warm_bottom": cpu(self._warm_bottom),
            "warm_precond": cpu(self._warm_precond),
            "estimates": self.estimates,
            "generator": self._generator.get_state(),
            "clock": self._clock.state(),
        }

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        if self.hvp == "auto" and state.get("hvp_method") is not None:
            self._method = state["hvp_method"]
        self._warm_top = state.get("warm_top")
        self._warm_bottom = state.get("warm_bottom")
        self._warm_precond = state.get("warm_precond")
        self.estimates = int(state.get("estimates", 0))
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])
        if state.get("clock") is not None:
            self._clock.load(state["clock"])
