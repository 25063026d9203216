"""config.py: every setting a dataclass field with its help, validation as user errors, and the
plain-dict round trip of the checkpoint."""

import dataclasses

import pytest

from latency_forecast import config
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig, TrainingConfig
from latency_forecast.errors import UserError

SETTINGS = [value for value in vars(config).values() if dataclasses.is_dataclass(value) and value.__module__ == config.__name__]


def test_every_field_has_its_help_and_every_class_its_group_title():
    assert len(SETTINGS) >= 12
    for config_class in SETTINGS:
        assert config_class.__doc__ and config_class.__doc__.strip(), config_class
        config_class()  # the defaults are valid
        for field in dataclasses.fields(config_class):
            assert field.metadata["help"].strip(), f"{config_class.__name__}.{field.name}"


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (DataConfig, {"sequence_length": 0}, "--sequence-length"),
        (DataConfig, {"validation_fraction": 0.5, "test_fraction": 0.45}, "at least 10%"),
        (DataConfig, {"validation_fraction": 1.5}, "--validation-fraction must be between 0 and 1, got 1.5"),
        (DataConfig, {"embargo_minutes": 3}, "--embargo-minutes"),
        (ModelConfig, {"dropout": 1.0}, "--dropout"),
        (ModelConfig, {"quantiles": "0.5,2"}, "--quantiles must be levels in (0, 1)"),
        (TrainingConfig, {"learning_rate": 0}, "--learning-rate"),
        (TrainingConfig, {"epochs": 0}, "--epochs must be at least 1"),
        (TrainingConfig, {"patience": 0}, "--patience must be at least 1"),
        (AlertConfig, {"target_fpr": 1.0}, "--target-fpr must be in [0, 1), got 1.0"),
    ],
)
def test_invalid_values_are_user_errors(cls, values, message):
    with pytest.raises(UserError) as raised:
        cls(**values)
    assert message in str(raised.value)


def test_round_trip_through_plain_dict_ignores_unknown_keys_and_defaults_missing_ones():
    original = ModelConfig(cell="gru", hidden_size=12)
    values = {**config.to_dict(original), "from_a_newer_version": 1}
    assert config.from_dict(ModelConfig, values) == original
    assert config.from_dict(ModelConfig, {"cell": "gru"}) == ModelConfig(cell="gru")
    assert config.to_dict(DataConfig(feature_columns=["a"]))["feature_columns"] == ["a"]
