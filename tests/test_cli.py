"""The `diagssm` command: argument checks and the `info` summary."""
import pytest

from diagssm.train.cli import main


def test_info_counts(capsys):
    main(["info", "S4D", "--d-model", "64", "--d-state", "64"])
    out = capsys.readouterr().out
    assert "S4D(d_model=64, d_state=64, init='legs'" in out
    assert out.rstrip().endswith("12,416")


def test_info_takes_the_layer_names_of_configs_and_bench(capsys):
    """`info s4d` (as configs and `bench --layers` spell it) had been an invalid choice."""
    main(["info", "s4d", "--d-model", "64", "--d-state", "64"])
    assert capsys.readouterr().out.rstrip().endswith("12,416")


def test_unknown_layer_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["info", "S6"])
    assert "invalid choice: 'S6'" in capsys.readouterr().err


def test_bench_help_is_the_benchmarks(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--quick" in capsys.readouterr().out


def test_ctrl_c_outside_training_exits_130_without_a_traceback(capsys, monkeypatch):
    """Ctrl-C in `data build` (or any command but train, which saves a checkpoint) had printed a
    KeyboardInterrupt traceback."""
    from diagssm.train import data_commands

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data_commands, "data_build", interrupted)
    assert main(["data", "build", "recall"]) == 130
    assert capsys.readouterr().err.strip() == "diagssm data: interrupted"
