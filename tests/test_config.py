"""config.py: every setting a dataclass field, its flag built from the field, several configs built
from one parse, validation as user errors, and the plain-dict round trip of the checkpoint."""

import dataclasses

import pytest

from latency_forecast import config
from latency_forecast.config import (
    AlertConfig,
    CausalityConfig,
    DataConfig,
    ModelConfig,
    ProgressConfig,
    SyntheticConfig,
    TrainingConfig,
)
from latency_forecast.errors import UserError
from tests.helpers import assert_documented_defaults, help_entries

CONFIGS = (DataConfig, ModelConfig, TrainingConfig, AlertConfig, ProgressConfig)


def _parser():
    return config.build_parser("t", "", [config.parent_parser(*CONFIGS)])


def _parse(*argv):
    return _parser().parse_args(list(argv))


def test_no_flags_build_the_dataclass_defaults():
    assert config.from_args(_parse(), *CONFIGS) == (DataConfig(), ModelConfig(), TrainingConfig(), AlertConfig(), ProgressConfig())


def test_help_shows_the_documented_defaults():
    # as the README and the contract write them
    assert_documented_defaults(
        _parser(),
        {
            "--sequence-length": "16",
            "--horizon": "5",
            "--latency-threshold": "500.0",
            "--latency-thresholds": "None",
            "--validation-fraction": "0.15",
            "--test-fraction": "0.15",
            "--cell": "lstm",
            "--hidden-size": "32",
            "--epochs": "20",
            "--seed": "0",
            "--device": "auto",
            "--num-threads": "0",
            "--target-fpr": "0.01",
            "--multitask": None,
            "--calibrate-per-service": None,
            "--quiet": None,
        },
    )
    entries = help_entries(_parser())
    assert entries["--cell"].startswith("--cell {lstm,gru} recurrent cell")
    assert entries["--feature-columns"].startswith("--feature-columns A,B,... comma-separated input features")


def test_every_field_has_its_flag_and_help():
    entries = help_entries(_parser())
    for config_class in CONFIGS:
        for field in dataclasses.fields(config_class):
            flag = "--" + field.name.replace("_", "-")
            assert flag in entries, flag
            assert field.metadata["help"].split()[0] in entries[flag], entries[flag]


def test_flags_parse_to_typed_config():
    args = _parse("--feature-columns", "cpu, fan_out", "--sequence-length", "8", "--cell", "gru", "--dropout", "0.2", "--multitask")
    data_config = config.from_args(args, DataConfig)
    assert data_config.feature_columns == ["cpu", "fan_out"]
    assert data_config.sequence_length == 8 and data_config.embargo == 8 + data_config.horizon
    model_config = config.from_args(args, ModelConfig)
    assert (model_config.cell, model_config.dropout, model_config.multitask) == ("gru", 0.2, True)


def test_several_classes_build_a_tuple_in_their_order():
    args = _parse("--horizon", "3", "--hidden-size", "12", "--target-fpr", "0.05", "--quiet")
    alert_config, data_config, progress = config.from_args(args, AlertConfig, DataConfig, ProgressConfig)
    assert alert_config == AlertConfig(target_fpr=0.05)
    assert data_config == DataConfig(horizon=3)
    assert progress == ProgressConfig(quiet=True)
    assert config.from_args(args, ModelConfig, TrainingConfig) == (ModelConfig(hidden_size=12), TrainingConfig())
    assert isinstance(config.from_args(args, ModelConfig), ModelConfig), "one class: the instance, not a tuple"
    with pytest.raises(UserError, match="--sequence-length must be at least 1"):
        config.from_args(_parse("--sequence-length", "0"), ModelConfig, DataConfig)


def test_bad_flags_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        _parse("--cell", "transformer")
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice: 'transformer'" in err and err.endswith("(see t --help)")
    with pytest.raises(SystemExit) as raised:
        _parse("--feature-columns", " , ")
    assert raised.value.code == 2
    assert "expected a comma-separated list of names" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (DataConfig, {"sequence_length": 0}, "--sequence-length"),
        (DataConfig, {"validation_fraction": 0.5, "test_fraction": 0.45}, "at least 10%"),
        (DataConfig, {"embargo_minutes": 3}, "--embargo-minutes"),
        (ModelConfig, {"dropout": 1.0}, "--dropout"),
        (TrainingConfig, {"learning_rate": 0}, "--learning-rate"),
        (TrainingConfig, {"epochs": 0}, "--epochs must be at least 1"),
        (AlertConfig, {"target_fpr": 1.0}, "--target-fpr must be in [0, 1), got 1.0"),
        (CausalityConfig, {"output": "report.txt"}, "--output must name a .json file"),
        (SyntheticConfig, {"days": 0}, "--days must be at least 1, got 0"),
        (SyntheticConfig, {"faults_per_day": -1.0}, "--faults-per-day must be 0 or more"),
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
