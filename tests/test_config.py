import dataclasses

import pytest

from latency_forecast import config
from latency_forecast.config import DataConfig, ModelConfig, TrainingConfig
from latency_forecast.errors import UserError


def _parse(*argv):
    parser = config.build_parser("t", "", [config.parent_parser(DataConfig, ModelConfig, TrainingConfig)])
    return parser.parse_args(list(argv))


def test_every_field_is_a_flag_with_its_default():
    args = _parse()
    for cls in (DataConfig, ModelConfig, TrainingConfig):
        for field in dataclasses.fields(cls):
            assert getattr(args, field.name) == field.default


def test_flags_parse_to_typed_config():
    args = _parse("--feature-columns", "cpu, fan_out", "--sequence-length", "8", "--cell", "gru", "--dropout", "0.2")
    data_config = config.from_args(DataConfig, args)
    assert data_config.feature_columns == ["cpu", "fan_out"]
    assert data_config.sequence_length == 8 and data_config.embargo == 8 + data_config.horizon
    assert config.from_args(ModelConfig, args).cell == "gru"


def test_bad_flags_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        _parse("--cell", "transformer")
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (DataConfig, {"sequence_length": 0}, "--sequence-length"),
        (DataConfig, {"validation_fraction": 0.5, "test_fraction": 0.45}, "at least 10%"),
        (DataConfig, {"embargo_minutes": 3}, "--embargo-minutes"),
        (ModelConfig, {"dropout": 1.0}, "--dropout"),
        (TrainingConfig, {"learning_rate": 0}, "--learning-rate"),
    ],
)
def test_invalid_values_are_user_errors(cls, values, message):
    with pytest.raises(UserError, match=message):
        cls(**values)


def test_round_trip_through_plain_dict_ignores_unknown_keys():
    original = ModelConfig(cell="gru", hidden_size=12)
    values = {**config.to_dict(original), "from_a_newer_version": 1}
    assert config.from_dict(ModelConfig, values) == original


def test_closed_stdout_ends_a_script_quietly():
    import subprocess
    import sys

    script = (
        "from latency_forecast.errors import cli_entrypoint\n"
        "@cli_entrypoint\n"
        "def main(argv=None):\n"
        "    for line in range(200_000):\n"
        "        print('line', line)\n"
        "    return 0\n"
        "raise SystemExit(main())\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()  # the reader goes away, as `| head -1` does
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
