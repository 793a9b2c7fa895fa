"""Student pretraining: :func:`regionclip.stages.pretrain.train` behind the usual arguments.

    python pretrain.py --config configs/demo.yaml [key=value ...]                 # one process
    accelerate launch pretrain.py --config configs/cc3m-rn50.yaml [key=value ...]  # GPUs, nodes
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 pretrain.py --config ...      # CPU processes
    python pretrain.py --config configs/demo.yaml pretrain.mode=image_text ...     # a plain CLIP trainer

A run whose ``pretrain.out_dir`` holds checkpoints resumes from the newest one. Exit status: 0
done, 1 bad input or a non-finite loss, 2 bad config or arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from regionclip.cli import config_from_argv, console_logging
from regionclip.errors import TrainingError
from regionclip.stages.inputs import pretrain_inputs
from regionclip.stages.pretrain import check_config, train


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = config_from_argv(
        argv, "Pretrain the RegionCLIP student (or a CLIP model with pretrain.mode=image_text)."
    )
    console_logging()
    try:
        check_config(cfg.pretrain)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg.pretrain, pretrain_inputs(cfg), cfg.device)
    except (ValueError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
