"""The CLI: every command answers --help; commands of open issues say so clearly."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import ROOT, hpcforge
COMMANDS = ["prepare", "train", "config", "bench", "evaluate", "explain", "attack", "report",
            "submit", "sweep", "status", "logs", "cancel"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command):
    r = hpcforge(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: hpcforge {command}")


def test_help_names_the_course_keys_where_users_look_for_them():
    """Issue #16: each key is in --help: transfer and adversarial training under train, labels
    from paths under prepare, the attention heads under explain, selection under sweep."""
    said = {c: " ".join(hpcforge(c, "--help").stdout.split()) for c in
            ("train", "prepare", "explain", "sweep")}
    for key in ("train.init_from=", "train.freeze=", "train.optim.groups.", "train.adversarial.eps="):
        assert key in said["train"], key
    assert "data.params.label_from=" in said["prepare"]
    assert "--heads" in said["explain"]
    assert "--rank-by" in said["sweep"] and "--stages" in said["sweep"]


def test_top_level_help_lists_commands():
    r = hpcforge("--help")
    assert r.returncode == 0
    for command in COMMANDS:
        assert command in r.stdout


def test_unknown_command_is_refused_with_the_choices():
    r = hpcforge("trian")
    assert r.returncode == 2
    assert "invalid choice: 'trian'" in r.stderr and "train" in r.stderr


def test_console_script_and_module_agree():
    exe = shutil.which("hpcforge", path=str(ROOT / ".venv" / "bin"))
    assert exe, "the venv must provide the hpcforge console command"
    import subprocess
    a = subprocess.run([exe, "config", "train.epochs=9"], capture_output=True, text=True, cwd=ROOT)
    b = hpcforge("config", "train.epochs=9")
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert json.loads(a.stdout)["train"]["epochs"] == 9
