"""flags.py: a flag per settings field with its default, type, choices and help; several configs
built from one parse; validation as user errors; a usage error as one line and exit status 2."""

import dataclasses
import typing

import pytest

from latency_forecast import flags
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig, ProgressConfig, TrainingConfig
from latency_forecast.errors import UserError
from tests.helpers import assert_documented_defaults, help_entries

CONFIGS = (DataConfig, ModelConfig, TrainingConfig, AlertConfig, ProgressConfig)


def _parser():
    return flags.build_parser("t", "", [flags.parent_parser(*CONFIGS)])


def _parse(*argv):
    return _parser().parse_args(list(argv))


def test_no_flags_build_the_dataclass_defaults():
    assert flags.from_args(_parse(), *CONFIGS) == (DataConfig(), ModelConfig(), TrainingConfig(), AlertConfig(), ProgressConfig())


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
            flag = flags.flag(field.name)
            assert flag in entries, flag
            assert field.metadata["help"].split()[0] in entries[flag], entries[flag]


def test_flags_parse_to_typed_config():
    args = _parse("--feature-columns", "cpu, fan_out", "--sequence-length", "8", "--cell", "gru", "--dropout", "0.2", "--multitask")
    data_config = flags.from_args(args, DataConfig)
    assert data_config.feature_columns == ["cpu", "fan_out"]
    assert data_config.sequence_length == 8 and data_config.embargo == 8 + data_config.horizon
    model_config = flags.from_args(args, ModelConfig)
    assert (model_config.cell, model_config.dropout, model_config.multitask) == ("gru", 0.2, True)


def test_several_classes_build_a_tuple_in_their_order():
    args = _parse("--horizon", "3", "--hidden-size", "12", "--target-fpr", "0.05", "--quiet")
    alert_config, data_config, progress = flags.from_args(args, AlertConfig, DataConfig, ProgressConfig)
    assert alert_config == AlertConfig(target_fpr=0.05)
    assert data_config == DataConfig(horizon=3)
    assert progress == ProgressConfig(quiet=True)
    assert flags.from_args(args, ModelConfig, TrainingConfig) == (ModelConfig(hidden_size=12), TrainingConfig())
    assert isinstance(flags.from_args(args, ModelConfig), ModelConfig), "one class: the instance, not a tuple"
    with pytest.raises(UserError, match="--sequence-length must be at least 1"):
        flags.from_args(_parse("--sequence-length", "0"), ModelConfig, DataConfig)


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


def test_any_dataclass_of_settings_gets_its_flags():
    @dataclasses.dataclass
    class Demo:
        """A demo group."""

        count: int = flags.setting(3, "how many")
        label: typing.Optional[str] = flags.setting(None, "a name", choices=("x", "y"))
        verbose: bool = flags.setting(False, "say more")

    parser = flags.build_parser("demo", "", [flags.parent_parser(Demo)])
    assert flags.from_args(parser.parse_args(["--count", "7", "--label", "y", "--verbose"]), Demo) == Demo(7, "y", True)
    assert flags.from_args(parser.parse_args([]), Demo) == Demo()
    entries = help_entries(parser)
    assert entries["--count"] == "--count COUNT how many (default: 3)"
    assert entries["--label"] == "--label {x,y} a name (default: None)"
    assert entries["--verbose"] == "--verbose say more"
    assert "A demo group:" in parser.format_help()
