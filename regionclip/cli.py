"""The one argument convention of every entry point: ``--config FILE`` plus ``key=value`` overrides.

Usage in an entry point (``python -m pipelines.x --config configs/demo.yaml a.b=1 c=2``)::

    def main(argv=None):
        cfg, args = config_from_argv(argv, "What this stage does.", extra_flags=add_flags)

where ``add_flags(parser)`` may add stage-specific flags to the argparse parser. Overrides and flags
may come in any order. An invalid config (unknown key, wrong type, unreadable file) prints one
``error:`` line to stderr and exits with status 2, like any other usage error, instead of a
traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from regionclip.config import ConfigError, ExperimentConfig, load_config
from regionclip.utils import resolve_device


def config_from_argv(
    argv: Sequence[str] | None,
    description: str,
    extra_flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[ExperimentConfig, argparse.Namespace]:
    """Parse ``argv`` (None = ``sys.argv[1:]``) and load the config; returns ``(cfg, args)``.

    ``args.config`` is the file (None = schema defaults only) and ``args.overrides`` the
    ``key=value`` strings, already applied to ``cfg``.
    """
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # set when run as `python -m x`
    prog = f"python -m {main_spec.name}" if main_spec is not None else None
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. shards.maxcount=500"
    )
    if extra_flags is not None:
        extra_flags(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return cfg, args


class _WithoutOpenClipInfo(logging.Filter):
    """open_clip logs a few INFO lines on the root logger per model it builds ("Loaded RN50 model
    config.", "... creation process complete."); on a stage's console they buried the project's
    own warnings. Its warnings and errors still show."""

    def __init__(self) -> None:
        super().__init__()
        spec = importlib.util.find_spec("open_clip")
        self.prefix = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not (
            self.prefix and record.pathname.startswith(self.prefix)
        )


def console_logging(level: int = logging.INFO, fmt: str = "%(message)s") -> None:
    """The console logging of every entry point: messages at ``level`` and above, without the
    libraries' chatter (open_clip's INFO lines, accelerate's line per checkpoint file)."""
    logging.basicConfig(level=level, format=fmt)
    root = logging.getLogger()
    if not any(isinstance(f, _WithoutOpenClipInfo) for f in root.filters):
        root.addFilter(_WithoutOpenClipInfo())
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def stage_setup(
    argv: Sequence[str] | None,
    description: str,
    extra_flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[ExperimentConfig, argparse.Namespace, torch.device]:
    """What every stage's entry point starts with: :func:`config_from_argv`, messages of the
    library's loggers on the console, and the config's device (:func:`device_from_config`)."""
    cfg, args = config_from_argv(argv, description, extra_flags)
    console_logging()
    return cfg, args, device_from_config(cfg.device)


def device_from_config(name: str) -> torch.device:
    """``resolve_device`` for entry points: a bad or unavailable device is a usage error (exit status 2)."""
    try:
        return resolve_device(name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def stop_after_flag(parser: argparse.ArgumentParser) -> None:
    """``--stop-after N`` of the resumable training stages (RPN, transfer)."""
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="train at most N steps now, checkpoint and exit (re-run resumes)",
    )


EntryPoint = Callable[[Sequence[str] | None], int]


def reports_errors(*errors: type[BaseException]) -> Callable[[EntryPoint], EntryPoint]:
    """Decorator of an entry point's ``main``: the given errors end it with one ``error: …`` line on
    stderr and exit status 1 (bad input), not a traceback."""

    def wrap(main: EntryPoint) -> EntryPoint:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except errors as e:
                print(f"error: {e}", file=sys.stderr)
                return 1

        return run

    return wrap
