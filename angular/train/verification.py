"""Verification by step while training (``train.verification``; docs/design.md, "Verification while
training"): every ``every_steps`` training steps of the run, and once more after the last, the
model's embeddings of insightface's ``.bin`` sets are scored by
:func:`angular.train.bins.verify_bins` (insightface's protocol, TAR at ``evaluate.verification.fars``).

- Only embeddings: the backbone embeds the sets (in eval mode, under the run's autocast); no head
  takes part, so on several processes rank 0 verifies with its replica of the backbone and no rank
  gathers the C x D centres for it. Every rank gets the numbers (the best is decided alike).
- MLflow gets ``verification/<set>/<metric>`` and ``verification/mean_accuracy`` at step = the
  run's training step; the final metrics hold the last scores and the best.
- The best by mean accuracy over the sets is kept: its scores in the checkpoints (so that a resumed
  run knows it) and, when the run has a ``best_model`` path (the stage: ``outputs/best/<item>.pt``),
  a model file of that step written there (as the final model file, loadable by ``load_model``);
  on several processes it is written as the final model file is (:mod:`angular.train.model_files`:
  the heads gathered, or a head too large to gather saved as its shards).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from angular.config import ConfigError, Params
from angular.data import DataError
from angular.train.bins import bin_stems, load_bin_set, verify_bins
from angular.train.epoch import autocast_dtype, autocasting
from angular.train.model_files import save_model
from angular.train.session import Session, say
from angular.train.world import World

__all__ = ["Verifier", "make_verifier", "flat_scores"]


@dataclasses.dataclass(frozen=True)
class Verifier:
    """``train.verification`` of a run, with what scoring needs."""

    bins: tuple[Path, ...]
    every_steps: int
    data: object  # the params' data section (image size, channels, mean, std)
    fars: tuple[float, ...]

    def due(self, run_step: int) -> bool:
        return run_step % self.every_steps == 0

    def verify(self, session: Session, world: World, run, run_step: int, epoch: int) -> None:
        """Score the sets at run step ``run_step`` (collective), log, and keep a new best."""
        results = world.from_rank_zero(lambda: self.scores(session))
        results = {  # NaN (a TAR below the set's resolution) is no JSON number: null
            stem: {key: value if math.isfinite(value) else None for key, value in scores.items()}
            for stem, scores in results.items()
        }
        mean = sum(scores["accuracy"] for scores in results.values()) / len(results)
        if run is not None:
            run.log_metrics(
                {**flat_scores(results), "verification/mean_accuracy": mean}, step=run_step
            )
        session.last_verification = {"step": run_step, "mean_accuracy": mean, "sets": results}
        best = session.best
        if best is not None and not mean > best["mean_accuracy"]:
            return
        session.best = {"step": run_step, "epoch": epoch, "mean_accuracy": mean, "sets": results}
        if session.paths.best_model is None:
            return
        save_model(session, world, {"verification": session.best}, session.paths.best_model)
        if world.rank == 0:
            say(
                f"{session.label}: best verification so far at step {run_step} (mean accuracy "
                f"{mean:.4f}): {session.paths.best_model}"
            )

    def scores(self, session: Session) -> dict[str, dict[str, float]]:
        """The sets' metrics with this process's model (its backbone: embeddings only)."""
        model = session.model
        dtype = autocast_dtype(session.config.precision)
        training = model.training
        model.eval()

        def embed(images):
            with autocasting(session.device, dtype):
                return model(images)

        try:
            return verify_bins(embed, self.bins, self.data, self.fars, device=session.device)
        finally:
            model.train(training)


def make_verifier(params: Params, world: World) -> Verifier | None:
    """The run's :class:`Verifier` (None without ``train.verification``), its sets read and
    checked on rank 0 before training starts: a bad one is one line on every rank."""
    config = params.train.verification
    if config is None:
        return None
    bins = tuple(Path(path) for path in config.bins)
    verifier = Verifier(bins, config.every_steps, params.data, params.evaluate.verification.fars)

    def problem() -> str | None:
        try:
            bin_stems(bins)
            for path in bins:
                load_bin_set(path, params.data)  # decoded once, cached for the scoring
        except (DataError, ValueError) as error:
            return str(error)
        return None

    found = world.from_rank_zero(problem)
    if found is not None:
        raise ConfigError("train.verification.bins", found)
    return verifier


def flat_scores(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"verification/<set>/<metric>": value}`` of the finite numbers."""
    return {
        f"verification/{stem}/{key}": float(value)
        for stem, scores in results.items()
        for key, value in scores.items()
        if isinstance(value, int | float) and math.isfinite(value)  # None: not a number
    }
