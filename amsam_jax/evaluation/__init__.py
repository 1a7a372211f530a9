"""Evaluation: metrics, the few-shot evaluation, the interactive click protocol, plots."""

from amsam_jax.utils.errors import AmsamError


class EvaluateError(AmsamError):
    """A workdir, checkpoint, setting or data folder that cannot be evaluated; one line."""
