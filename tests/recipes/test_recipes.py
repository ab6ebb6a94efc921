"""The recipe matrix: every everyday recipe trains without a false alarm, and its sick twin is caught."""

from __future__ import annotations

from typing import Any

import pytest
from recipes.cases import RECIPES
from recipes.common import Recipe, assert_detects, assert_healthy, assert_trains, describe, run


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_healthy_recipe_raises_no_warning_and_logs_the_users_loss(tmp_path: Any, recipe: Recipe) -> None:
    result = run(recipe, tmp_path, sick=False)
    assert_trains(result, recipe.final_loss)
    assert_healthy(result)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_sick_twin_is_caught(tmp_path: Any, recipe: Recipe) -> None:
    assert_detects(run(recipe, tmp_path, sick=True), recipe.code)


def lightning_log_cadence(options: dict[str, Any]) -> None:
    options["log_every_n_steps"] = 50  # Lightning's default: most steps are not log steps


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_with_checks_on_every_64th_step_the_verdicts_hold(tmp_path: Any, recipe: Recipe) -> None:
    """The gradient checks at their sparsest, and Lightning's logging cadence.

    A budget no check fits makes the stride the largest (64): no false alarm on a healthy recipe,
    every sick twin caught.
    """
    sampled = {"overhead_budget": 1e-9}
    healthy = run(
        recipe, tmp_path / "healthy", sick=False, monitor_options=sampled, adapt=lightning_log_cadence
    )
    assert_trains(healthy, recipe.final_loss)
    loud = [a for a in healthy.alerts if a.severity != "info"]
    assert not loud, "false alarm on a healthy recipe:\n" + describe(healthy.alerts)
    sick = run(recipe, tmp_path / "sick", sick=True, monitor_options=sampled, adapt=lightning_log_cadence)
    assert_detects(sick, recipe.code)
