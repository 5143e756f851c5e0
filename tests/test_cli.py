import subprocess
import sys

from kormedgemma.cli import main


def test_list_prints_every_notebook(capsys):
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    assert "0.04  phase0_data_preparation/04_preprocess_data.ipynb" in out


def test_bad_profile_exits_2_with_one_line(capsys):
    assert main(["run", "--profile", "a6000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown profile 'a6000'; known profiles: a5000, gemma3_270m, tiny"


def test_bad_override_names_the_key(capsys):
    assert main(["run", "--set", "tokenizer.min_frequency=0"]) == 2
    assert "tokenizer.min_frequency: must be ≥ 1 (got 0)" in capsys.readouterr().err
    assert main(["run", "--set", "oops"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_module_entry_point_has_help():
    result = subprocess.run([sys.executable, "-m", "kormedgemma", "run", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--from" in result.stdout and "--force" in result.stdout
