"""script_config.py: the other scripts' settings, each a field with its help and valid defaults,
and their validation as user errors."""

import dataclasses

import pytest

from latency_forecast import script_config
from latency_forecast.errors import UserError
from latency_forecast.script_config import BacktestConfig, CausalityConfig, ForecastConfig, SyntheticConfig

SETTINGS = [
    value for value in vars(script_config).values()
    if dataclasses.is_dataclass(value) and value.__module__ == script_config.__name__
]


def test_every_field_has_its_help_and_the_defaults_are_valid():
    assert {cls.__name__ for cls in SETTINGS} == {"CheckpointConfig", "CausalityConfig", "ForecastConfig", "BacktestConfig", "SyntheticConfig"}
    for config_class in SETTINGS:
        config_class()
        for field in dataclasses.fields(config_class):
            assert field.metadata["help"].strip(), f"{config_class.__name__}.{field.name}"


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (CausalityConfig, {"output": "report.txt"}, "--output must name a .json file"),
        (CausalityConfig, {"max_samples": -1}, "--max-samples must be 0 or more"),
        (ForecastConfig, {"output": "forecasts.txt"}, "--output must name a .json file, got forecasts.txt"),
        (ForecastConfig, {"alertmanager_timeout": 0.0}, "--alertmanager-timeout must be positive (seconds)"),
        (BacktestConfig, {"step_days": 0.0}, "--step-days must be positive (at least one minute), got 0.0"),
        (BacktestConfig, {"ray_address": "auto"}, "--ray-address auto is only used with --executor ray"),
        (SyntheticConfig, {"days": 0}, "--days must be at least 1, got 0"),
        (SyntheticConfig, {"faults_per_day": -1.0}, "--faults-per-day must be 0 or more"),
    ],
)
def test_invalid_values_are_user_errors(cls, values, message):
    with pytest.raises(UserError) as raised:
        cls(**values)
    assert message in str(raised.value)


def test_backtest_windows_in_minutes():
    settings = BacktestConfig(train_window_days=1.5, val_window_days=0.5)
    assert (settings.train_window_minutes, settings.val_window_minutes, settings.step_minutes) == (2160, 720, 720)
    assert BacktestConfig(step_days=0.25).step_minutes == 360
