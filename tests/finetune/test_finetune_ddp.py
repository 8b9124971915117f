"""Stage -1 under torchrun with 2 CPU processes (gloo): one folder, written once, loadable."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from protoquant.backbones.frozen import create_backbone
from protoquant.finetuning.files import RESULT_FILE, RESUME_FILE, WEIGHTS_FILE
from tests.finetune.conftest import tiny_config

JOB = Path(__file__).with_name("ddp_job.py")


def test_two_processes_fine_tune_into_one_finished_folder(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parents[2])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, str(JOB), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folders = list((tmp_path / "cache").glob("finetune/*"))
    assert len(folders) == 1  # both ranks agreed on the key
    meta = json.loads((folders[0] / RESULT_FILE).read_text())
    assert meta["processes"] == 2 and meta["epochs_run"] == 2
    assert not (folders[0] / RESUME_FILE).exists()
    config = tiny_config(tmp_path, batch_size=4)
    frozen = create_backbone(replace(config.backbone, weights=str(folders[0] / WEIGHTS_FILE)))
    assert frozen.info.weights_hash == meta["weights_hash"]
