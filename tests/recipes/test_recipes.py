"""The recipe matrix: every everyday recipe trains without a false alarm, and its sick twin is caught."""

from __future__ import annotations

from typing import Any

import pytest
from recipes.cases import RECIPES
from recipes.common import Recipe, assert_detects, assert_healthy, assert_trains, run


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_healthy_recipe_raises_no_warning_and_logs_the_users_loss(tmp_path: Any, recipe: Recipe) -> None:
    result = run(recipe, tmp_path, sick=False)
    assert_trains(result, recipe.final_loss)
    assert_healthy(result)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_sick_twin_is_caught(tmp_path: Any, recipe: Recipe) -> None:
    assert_detects(run(recipe, tmp_path, sick=True), recipe.code)
