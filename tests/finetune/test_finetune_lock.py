"""One job fine-tunes into a folder at a time; a second one of the same key waits and reuses it."""

from __future__ import annotations

import logging
import os
import shutil
import threading

import pytest

from protoquant.cache.lock import try_flock
from protoquant.finetuning import files, finetune, loop
from protoquant.finetuning.files import LOCK_FILE, RESULT_FILE


def test_a_second_job_waits_for_the_first_and_takes_its_result(
    finished, with_out, tmp_path, monkeypatch, caplog
):
    config, result = finished["torchvision/mobilenet_v3_small"]
    folder = tmp_path / "shared"
    shutil.copytree(result.folder, folder, ignore=shutil.ignore_patterns(RESULT_FILE, LOCK_FILE))
    held = try_flock(folder / LOCK_FILE)  # "another process" is training into the folder
    assert held is not None

    def first_job_finishes() -> None:
        shutil.copy(result.folder / RESULT_FILE, folder / RESULT_FILE)
        os.close(held)

    monkeypatch.setattr(files, "LOCK_POLL_SECONDS", 0.05)
    monkeypatch.setattr(loop, "run_epoch", lambda *args: pytest.fail("trained although another job finished"))
    timer = threading.Timer(0.3, first_job_finishes)
    timer.start()
    with caplog.at_level(logging.WARNING, logger="protoquant.finetuning.files"):
        again = finetune(with_out(config, folder))
    timer.join()
    assert "another process is fine-tuning" in caplog.text
    assert again.weights_hash == result.weights_hash and again.folder == folder


def test_the_lock_is_free_again_once_a_job_is_done(with_out, tmp_path) -> None:
    from tests.finetune.conftest import tiny_config

    config = with_out(tiny_config(tmp_path, epochs=1), tmp_path / "folder")
    done = finetune(config)
    fd = try_flock(done.folder / LOCK_FILE)
    assert fd is not None  # released by the job that trained
    other = try_flock(done.folder / LOCK_FILE)
    assert other is None  # and it is exclusive
    os.close(fd)
