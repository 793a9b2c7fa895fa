"""Train / evaluate the open-vocabulary detector with Detectron2 (``tools/train_net.py`` style).

    python -m pipelines.detectron2_train --config-file configs/detectron2/EmojiWorld-C4.yaml \\
        [--eval-only] [--resume] [--num-gpus N] [KEY VALUE ...]

Needs Detectron2 (installed from source, see docs/detectron2.md). Registers the COCO-format
datasets of ``DATASETS.REGISTER_COCO``, then runs Detectron2's ``DefaultTrainer`` (with
:class:`~regionclip.transfer.detectron2.train.RegionCLIPTrainer`'s data and evaluator) under
``launch``; ``--eval-only`` loads ``MODEL.WEIGHTS`` and evaluates every ``DATASETS.TEST``
with its own vocabulary. Metrics go to ``OUTPUT_DIR/inference/<dataset>/metrics.json``.
Exit status: 0 done, 1 bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch

from regionclip.proposals import ProposalError
from regionclip.transfer.detectron2.data import register_datasets
from regionclip.transfer.detectron2.train import RegionCLIPTrainer, setup_cfg
from regionclip.transfer.engine import TransferError


def run(args):
    """One process's work (``launch`` calls it in every worker): train, or evaluate with --eval-only."""
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    register_datasets(cfg)
    if args.eval_only:
        model = RegionCLIPTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return RegionCLIPTrainer.test(cfg, model)
    trainer = RegionCLIPTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv: Sequence[str] | None = None) -> int:
    args = default_argument_parser().parse_args(argv)
    try:
        launch(
            run,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (TransferError, ProposalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
