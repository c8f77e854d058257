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


def test_a_runs_data_records_read_each_file_once_and_are_the_sha256_of_the_files_sha256s(tmp_path, monkeypatch):
    """A run records the sha256 of all four files and of the two training files (data.data_sha256):
    each is the sha256 of the files' own hex digests, in torchvision's order, computed here by hand;
    the training files, in both records, are read once per run start, not once per record."""
    import hashlib

    from omegaconf import OmegaConf

    from conftest import write_root

    root = write_root(tmp_path / "data")
    raw = root / "MNIST" / "raw"
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in raw.iterdir()}
    order = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    read = []
    plain = provenance.sha256_of
    monkeypatch.setattr(provenance, "sha256_of", lambda path: read.append(Path(path).name) or plain(path))
    cfg = OmegaConf.create({"data": {"root": str(root), "name": "mnist"}})
    record = provenance.inputs(cfg)
    assert record["data_sha256"] == hashlib.sha256("".join(digest[f] for f in order).encode()).hexdigest()
    assert record["train_data_sha256"] == hashlib.sha256("".join(digest[f] for f in order[:2]).encode()).hexdigest()
    assert sorted(read) == sorted(order)
    (raw / order[0]).write_bytes((raw / order[0]).read_bytes() + b"\0")  # one image file changed: read again
    read.clear()
    changed = provenance.inputs(cfg)
    assert read == [order[0]] and changed["data_sha256"] != record["data_sha256"]
