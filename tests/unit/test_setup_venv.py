"""scripts/setup.sh's venv step (ensure_venv), run on a temporary folder: a broken venv is made again,
and python3-venv is installed through apt when python3 cannot make venvs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import REPO

REAL_PYTHON3 = shutil.which("python3")
pytestmark = pytest.mark.skipif(REAL_PYTHON3 is None, reason="no python3 on PATH")


def ensure_venv(venv: Path, path_dirs: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.pathsep.join([*map(str, path_dirs), os.environ["PATH"]])}
    return subprocess.run(["bash", "-c", 'source scripts/setup.sh && ensure_venv "$1"', "_", str(venv)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def pip_runs(venv: Path) -> bool:
    return subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode == 0


def test_a_venv_without_pip_is_removed_and_made_again(tmp_path: Path):
    venv = tmp_path / ".venv"
    # What `python3 -m venv` leaves when ensurepip is missing: an interpreter, no pip.
    subprocess.run([REAL_PYTHON3, "-m", "venv", "--without-pip", venv], check=True)
    (venv / "leftover").write_text("from the half-made venv")
    assert not pip_runs(venv)
    result = ensure_venv(venv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is broken" in result.stdout
    assert pip_runs(venv) and not (venv / "leftover").exists()


def test_a_working_venv_is_kept(tmp_path: Path):
    venv = tmp_path / ".venv"
    subprocess.run([REAL_PYTHON3, "-m", "venv", venv], check=True)
    (venv / "kept").write_text("")
    result = ensure_venv(venv)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    assert (venv / "kept").exists()


def test_python3_venv_is_installed_when_ensurepip_is_missing(tmp_path: Path):
    """A python3 without ensurepip (Debian without python3-venv) until apt-get installs python3-venv."""
    fake = tmp_path / "bin"
    fake.mkdir()
    installed, calls = tmp_path / "installed", tmp_path / "apt-calls"
    (fake / "python3").write_text(f"""#!/bin/bash
if [[ "$1" == -c && "$2" == *ensurepip* && ! -e {installed} ]]; then exit 1; fi
if [[ "$1" == -m && "$2" == venv && ! -e {installed} ]]; then "{REAL_PYTHON3}" -m venv --without-pip "$3"; exit 1; fi
exec "{REAL_PYTHON3}" "$@"
""")
    (fake / "apt-get").write_text(f"""#!/bin/bash
echo "$@" >>{calls}
if [[ "$1" == install ]]; then touch {installed}; fi
""")
    (fake / "sudo").write_text('#!/bin/bash\nexec "$@"\n')  # when the tests do not run as root
    for tool in fake.iterdir():
        tool.chmod(0o755)
    venv = tmp_path / ".venv"
    result = ensure_venv(venv, [fake])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installing python3-venv" in result.stdout
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq --no-install-recommends python3-venv"]
    assert pip_runs(venv)


def test_a_venv_that_cannot_get_pip_fails_and_is_not_left_behind(tmp_path: Path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f"""#!/bin/bash
if [[ "$1" == -m && "$2" == venv ]]; then "{REAL_PYTHON3}" -m venv --without-pip "$3"; exit 0; fi
exec "{REAL_PYTHON3}" "$@"
""")
    (fake / "python3").chmod(0o755)
    venv = tmp_path / ".venv"
    result = ensure_venv(venv, [fake])
    assert result.returncode != 0
    assert "did not make a venv with pip" in result.stderr
    assert not venv.exists()
