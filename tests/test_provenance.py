"""What a run records of where its code came from: the git commit (a record for the reader; the
code's sha256 is what resume checks, tests/test_refusals.py)."""
import shutil
import subprocess
from pathlib import Path

import pytest

import kd_cli
from kd_cli import provenance


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_revision_is_the_commit_kd_runs_from_and_says_when_its_files_differ(tmp_path, monkeypatch):
    pkg = tmp_path / "repo" / "kd_cli"
    shutil.copytree(Path(kd_cli.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "__file__", str(pkg / "provenance.py"))
    repo = pkg.parent
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "v1", "-m", "v1")  # not v1
    commit = git(repo, "rev-parse", "HEAD")
    assert provenance.kd_revision() == commit
    (pkg / "losses.py").write_text((pkg / "losses.py").read_text() + "\n# an edit\n")
    assert provenance.kd_revision() == commit + "-dirty"


def test_an_installed_copy_outside_git_records_no_revision(tmp_path, monkeypatch):
    pkg = tmp_path / "site-packages" / "kd_cli"
    shutil.copytree(Path(kd_cli.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "__file__", str(pkg / "provenance.py"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # /tmp itself may sit in a repo
    assert provenance.kd_revision() is None
