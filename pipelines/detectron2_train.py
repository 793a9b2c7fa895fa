"""Train / evaluate the open-vocabulary detector with Detectron2 (``tools/train_net.py`` style).

    python -m pipelines.detectron2_train --config-file configs/detectron2/EmojiWorld-C4.yaml \\
        [--eval-only] [--resume] [--num-gpus N] [KEY VALUE ...]

Needs Detectron2 (docs/detectron2.md). Registers the COCO-format datasets of
``DATASETS.REGISTER_COCO``, then runs :class:`~regionclip.transfer.detectron2.train.RegionCLIPTrainer`
under Detectron2's ``launch``; ``--eval-only`` loads ``MODEL.WEIGHTS`` and evaluates every
``DATASETS.TEST`` with its own vocabulary. Metrics go to ``OUTPUT_DIR/inference/<dataset>/metrics.json``.
Exit status: 0 done, 1 bad input or Detectron2 missing.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

from regionclip.cli import reports_errors
from regionclip.errors import InputError

MISSING = (
    "error: python -m pipelines.detectron2_train needs Detectron2, which is not installed in this "
    "Python: run `make install-detectron2` (docs/detectron2.md)"
)


@reports_errors(InputError)
def main(argv: Sequence[str] | None = None) -> int:
    if importlib.util.find_spec("detectron2") is None:
        print(MISSING, file=sys.stderr)
        return 1
    from detectron2.engine import default_argument_parser, launch

    from regionclip.transfer.detectron2.train import check_inputs, run, setup_cfg

    args = default_argument_parser().parse_args(argv)
    check_inputs(setup_cfg(args.config_file, args.opts), args.eval_only, args.resume)
    launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
