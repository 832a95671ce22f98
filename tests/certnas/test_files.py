"""The environment record of result files: which code produced them."""
import os
import shutil
import subprocess

import pytest

from certnas import files


def _git(directory, *args):
    return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_source_commit_names_the_checked_out_commit_and_marks_changed_tracked_files(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    first = _git(tmp_path, "rev-parse", "HEAD")
    assert files.source_commit(tmp_path) == first
    (tmp_path / "untracked.txt").write_text("x\n")  # untracked files do not make the code differ
    assert files.source_commit(tmp_path) == first
    (tmp_path / "a.txt").write_text("two\n")
    assert files.source_commit(tmp_path) == first + "+dirty"
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "second")
    assert files.source_commit(tmp_path) not in (first, first + "+dirty", "")


def test_source_commit_outside_git_is_empty(tmp_path):
    assert files.source_commit(tmp_path / "nowhere") == ""


def test_the_environment_records_the_commit_read_at_import_not_at_writing(monkeypatch):
    def no_git(*args, **kwargs):
        raise AssertionError("git was run again while writing a result")

    monkeypatch.setattr(files.subprocess, "run", no_git)
    assert files.environment()["git_commit"] == files.SOURCE_COMMIT


def test_the_environment_names_the_cpu_and_the_thread_count(monkeypatch):
    """Every timing is only comparable on one CPU at one thread count: both are in the record."""
    record = files.environment()
    assert record["cpu"] == files.cpu_model() and record["cpu"]
    assert record["cpu_count"] == os.cpu_count()
    monkeypatch.setattr(files.torch, "get_num_threads", lambda: 3)
    assert files.environment()["torch_threads"] == 3
