"""Benchmark 5: the same training run with 1 process and with 2 processes under torchrun.

Runs `protoquant train` on the built-in data (demo settings, fresh caches) with
`torchrun --nproc_per_node 1` and `2`, then prints time and test accuracy of each.

    python benchmarks/distributed.py [--out runs/bench-dist] [--processes 1,2] [--device cpu]

With `--device cuda` each process uses its own GPU (cuda:LOCAL_RANK, NCCL), so the process
count must not exceed the GPUs of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import machine

FLAGS = ["--codebook.num_prototypes", "256", "--codebook.epochs", "10", "--head.temperature_grid", "0.05,0.1",
         "--head.lr_grid", "0.05,0.2"]  # fmt: skip


def launch(processes: int, out: Path, device: str) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "protoquant.cli", "train", "--out", str(out), "--cache.root", str(out / "cache"), *FLAGS, "--device", device]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    start = time.perf_counter()
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - start, json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench-dist")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    backend = "NCCL" if args.device.startswith("cuda") else "gloo"
    print(
        f"machine: {machine()}; built-in data, demo settings, device {args.device}, {backend}, CPU threads split"
    )
    print("| processes | wall s | cache s | train s | probe acc | ProtoQuant acc |")
    print("|---|---|---|---|---|---|")
    for processes in (int(p) for p in args.processes.split(",")):
        wall, metrics = launch(processes, Path(args.out) / f"p{processes}", args.device)
        timing = metrics["timing"]
        print(f"| {processes} | {wall:.0f} | {timing['cache_seconds']:.0f} | {timing['train_seconds']:.0f} | "
              f"{metrics['linear_probe']['test_accuracy']:.3f} | {metrics['protoquant']['test_accuracy']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
