"""The command line from another directory: paths anchored at the project (or --home/--store),
bad input refused in one line before anything is written, readable --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from influence_pipeline.cli import main
from influence_pipeline.project import project_root

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("influence-pipeline")


def clean_environment(monkeypatch) -> None:
    """No DAGSTER_HOME / INFLUENCE_STORE / INFLUENCE_EXAMPLE, and what main() exports is
    undone after the test."""
    for name in ("DAGSTER_HOME", "INFLUENCE_STORE", "INFLUENCE_EXAMPLE"):
        monkeypatch.setenv(name, "")  # records the original value for the undo
        monkeypatch.delenv(name)


def test_help_from_another_directory_is_plain_text(tmp_path):
    out = subprocess.run(
        [str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    for command in ("run", "status", "audit", "ui"):
        assert f"    {command} " in out
    assert "``" not in out and ":func:" not in out  # no raw RST
    assert list(tmp_path.iterdir()) == []


def test_status_from_another_directory_uses_the_project(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    clean_environment(monkeypatch)
    assert project_root() == REPO
    code = main(["status"])
    captured = capsys.readouterr()
    assert f"Dagster instance: {REPO / 'dagster_home'}" in captured.out
    assert f"store: {REPO / 'influence_store'}" in captured.out
    if code != 0:  # no store in this checkout yet: refused clearly, in one line
        assert code == 2 and "Run `influence-pipeline run` first." in captured.err
        assert captured.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing made in the current directory


def test_bad_input_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    clean_environment(monkeypatch)
    home, store = tmp_path / "home", tmp_path / "store"
    base = ["--home", str(home), "--store", str(store), "run"]
    for extra, expected in (
        (["--method", "ektac"], "method='ektac' is not one of direct, cg, lissa"),
        (["--regularization", "-1"], "regularization: Input should be greater than or equal"),
        (["--test-set", "nope"], "--test-set nope: not a test set of workload 'digits'"),
        (
            ["--example", "tiny-gpt", "--test-set", "nope"],
            "--test-set nope: not a test set of workload 'tiny-gpt'; choose from heldout",
        ),
    ):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
