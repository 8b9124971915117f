"""A tiny fine-tuning, launched by tests/finetune/test_finetune_ddp.py under torchrun."""

import sys
from pathlib import Path

from protoquant.finetuning import finetune
from tests.finetune.conftest import tiny_config

if __name__ == "__main__":
    config = tiny_config(Path(sys.argv[1]), batch_size=4)  # 2 images per process: Mixup needs pairs
    finetune(config)
