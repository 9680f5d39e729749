"""MLflow tracking (docs/design.md, Tracking): one run per stage execution, or nothing when the store is unusable.

- The store is ``tracking.uri`` when set, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite
  store ``sqlite:///mlflow.db`` in the project folder (artifacts under ``mlruns/``). Open it with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
- One experiment per project (``tracking.experiment``); each run is named after its stage
  (``train@arcface``) and tagged with the git commit, the stage and the head(s) (train runs also
  with the backend that served the margin ops).
- When the store cannot be reached or written, the stage goes on and says once that tracking is
  off; with ``tracking.required: true`` it stops first with a :class:`TrackingError` instead.
- A run always ends: ``FINISHED``, or ``FAILED`` when the stage raises (``KILLED`` on Ctrl-C), so
  no run is left half-written in ``mlflow ui``. (Only a SIGKILL can leave one ``RUNNING``.)
- Telemetry is off: ``MLFLOW_DISABLE_TELEMETRY`` and ``DO_NOT_TRACK`` are set (unless the user set
  them), and HTTP stores fail fast instead of retrying for minutes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from angular.config import TrackingConfig

for _name, _value in (
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DO_NOT_TRACK", "true"),
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
):
    os.environ.setdefault(_name, _value)

__all__ = ["DEFAULT_URI", "TrackingError", "StageRun", "resolve_uri", "flatten", "git_commit"]

DEFAULT_URI = "sqlite:///mlflow.db"
_INVALID_NAME_CHARS = re.compile(r"[^\w./\- :]")
_MAX_PARAM_VALUE = 6000
_BATCH = 100  # MLflow accepts at most 100 params (1000 metrics) per log_batch


@contextlib.contextmanager
def _quiet_mlflow():
    """Silence MLflow's own logging (tracebacks of store errors, schema migration notes): a failure
    is reported once, by :class:`StageRun`."""
    import mlflow  # noqa: F401  (importing it configures its loggers, which must come first)

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_message(error: BaseException) -> str:
    """The innermost cause's first line (``attempt to write a readonly database``), with its type."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used and ``tracking.required`` is true."""


def resolve_uri(config: TrackingConfig) -> str:
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested params as ``{"train.epochs": "12", ...}`` (lists as their YAML-like text)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value)[:_MAX_PARAM_VALUE]
    return flat


def metric_name(name: str) -> str:
    """A metric name MLflow accepts (``tar@far=1e-2`` -> ``tar_far_1e-2``)."""
    return _INVALID_NAME_CHARS.sub("_", name)


def git_commit(cwd: str | Path = ".") -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the work tree, or ``(None, None)`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


class StageRun:
    """One MLflow run for one stage execution; a context manager. Every method is a no-op once
    tracking is off, and no tracking failure propagates unless ``tracking.required`` is true."""

    def __init__(
        self,
        config: TrackingConfig,
        *,
        stage: str,
        heads: Iterable[str] = (),
        params: Mapping | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        self.config = config
        self.stage = stage
        self.heads = list(heads)
        self.params = dict(params or {})
        self.extra_tags = dict(tags or {})
        self.uri = resolve_uri(config)
        self.client = None
        self.run_id: str | None = None
        self.off_reason: str | None = None if config.enabled else "tracking.enabled is false"

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.off_reason is None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> StageRun:
        if self.off_reason is None:
            try:
                with _quiet_mlflow():
                    self._start()
            except Exception as error:
                self._turn_off(error, when="starting the run")
        return self

    def _start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(self.config.experiment)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(self.config.experiment)
            except Exception:  # created meanwhile by another stage
                experiment = self.client.get_experiment_by_name(self.config.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        commit, dirty = git_commit()
        tags = {
            "mlflow.runName": self.stage,
            "stage": self.stage.split("@")[0],
            "dvc_stage": self.stage,
            "head": ",".join(self.heads),
            **self.extra_tags,
        }
        if commit:
            tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
            tags["git_dirty"] = str(dirty).lower()
        run = self.client.create_run(experiment_id, tags=tags, run_name=self.stage)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(self.params).items()]
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + _BATCH])

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.run_id is None or self.client is None:
            return
        if exc_type is None and self.off_reason is None:
            status = "FINISHED"
        elif exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        try:
            with _quiet_mlflow():
                if exc is not None:
                    self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
                self.client.set_terminated(self.run_id, status)
        except Exception as error:
            if self.off_reason is None:
                self._say_off(f"could not end the run ({error})")

    # -- logging -----------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics (NaN and inf are left out: MLflow's UI cannot plot them)."""
        if not self.active:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        entries = [
            Metric(metric_name(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        self._guard(
            lambda: [
                self.client.log_batch(self.run_id, metrics=entries[i : i + 1000])
                for i in range(0, len(entries), 1000)
            ],
            "logging metrics",
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._guard(
                lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path),
                f"logging {path}",
            )
        elif path.is_file():
            self._guard(
                lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
                f"logging {path}",
            )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            self._guard(
                lambda: [self.client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()],
                "setting tags",
            )

    # -- failures ----------------------------------------------------------------------------------

    def _guard(self, action, what: str) -> None:
        try:
            with _quiet_mlflow():
                action()
        except Exception as error:
            if self.run_id is not None:
                try:  # do not leave the run RUNNING when the store still answers
                    with _quiet_mlflow():
                        self.client.set_terminated(self.run_id, "FAILED")
                except Exception:
                    pass
            self._turn_off(error, when=what)

    def _turn_off(self, error: Exception, *, when: str) -> None:
        detail = _root_message(error)
        if self.config.required:
            raise TrackingError(
                f"tracking.required is true but the MLflow store {self.uri} failed while {when} "
                f"({detail}); fix the store or set tracking.required: false"
            ) from error
        self._say_off(f"{when} failed ({detail})")

    def _say_off(self, reason: str) -> None:
        self.off_reason = reason
        print(
            f"{self.stage}: MLflow tracking is off for this run: the store {self.uri} is not "
            f"usable: {reason}. The stage goes on without it.",
            file=sys.stderr,
            flush=True,
        )
