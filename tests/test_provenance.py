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


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_kd_inside_a_larger_repository_records_that_repositorys_commit(tmp_path, monkeypatch):
    mono = tmp_path / "mono"
    pkg = mono / "tools" / "kd" / "kd_cli"
    shutil.copytree(Path(kd_cli.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    git(mono, "init", "-q")
    git(mono, "add", ".")
    git(mono, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.setattr(provenance, "__file__", str(pkg / "provenance.py"))
    assert provenance.kd_revision() == git(mono, "rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_an_installed_copy_records_no_revision_even_inside_another_repository(tmp_path, monkeypatch):
    project = tmp_path / "project"  # a user's project with kd installed in its own venv
    pkg = project / ".venv" / "site-packages" / "kd_cli"
    shutil.copytree(Path(kd_cli.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "notes.txt").write_text("x\n")
    git(project, "init", "-q")
    git(project, "add", "notes.txt")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.setattr(provenance, "__file__", str(pkg / "provenance.py"))
    assert provenance.kd_revision() is None  # not the project's commit
