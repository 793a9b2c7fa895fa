"""The project's error types. Each message names the file, sample or config key at fault, so an
entry point prints it as one ``error:`` line instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its source."""


class InputError(ValueError):
    """Bad input: a file that is missing, unreadable or malformed, or a setting that cannot work."""


class ProposalError(InputError):
    """Bad input of the proposal stage (box json, image folder, RPN weights, proposals file)."""


class TransferError(InputError):
    """Bad input of the detector transfer (json, images, embeddings, checkpoint, config key)."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the batch."""
