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
import fcntl
import hashlib
import logging
import math
import os
import re
import subprocess
import sys
import time
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

__all__ = [
    "DEFAULT_URI",
    "TrackingError",
    "StageRun",
    "resolve_uri",
    "project_folder",
    "dvc_tags",
    "flatten",
    "git_commit",
]

DEFAULT_URI = "sqlite:///mlflow.db"
_INVALID_NAME_CHARS = re.compile(r"[^\w./\- :]")
_MAX_PARAM_VALUE = 6000
_BATCH = 100  # MLflow accepts at most 100 params (1000 metrics) per log_batch
_LOCK_WAIT_S = 120.0  # a store lock held longer than this is not waited for (a stuck writer)
_LOCKED_RETRIES = 6  # attempts of a store call that SQLite answers with "database is locked"
PIPELINE_KEY_TAG = "pipeline_key"


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


def project_folder() -> Path:
    """The folder whose ``mlflow.db`` is the default store: the working directory, mapped onto
    ``$DVC_ROOT`` when DVC runs the stage.

    DVC sets ``DVC_ROOT`` to the repository it runs the experiment for, also when the stage runs in
    a temporary copy (queued and ``--temp`` experiments). The stage's folder relative to the copy's
    root (the nearest folder with a ``.dvc`` in it; ``experiments/faces`` for the faces stages) is
    the same folder relative to ``DVC_ROOT``."""
    cwd = Path.cwd().resolve()
    root = os.environ.get("DVC_ROOT")
    if not root:
        return cwd
    for ancestor in (cwd, *cwd.parents):
        if (ancestor / ".dvc").is_dir():
            return Path(root).resolve() / cwd.relative_to(ancestor)
    return Path(root).resolve()


def _absolute_sqlite(uri: str, folder: Path) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////<folder>/mlflow.db`` (absolute paths, ``file:``
    URIs and other stores unchanged)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix) :]
    if path.startswith(("/", "file:")) or path in ("", ":memory:"):
        return uri
    return f"{prefix}{folder / path}"


def resolve_uri(config: TrackingConfig) -> str:
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    return _absolute_sqlite(uri, project_folder())


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI (None for other stores)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    path = path.removeprefix("file:")
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise the processes writing one local SQLite store: an ``flock`` on the store's
    folder (no lock file is left behind; SQLite's own locks are POSIX locks on the database file,
    independent of this one). Other stores, or a folder that cannot be opened: no lock."""
    path = _sqlite_path(uri)
    fd = None
    if path is not None:
        try:
            fd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
        except OSError:
            fd = None
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:  # go on; SQLite's busy timeout still applies
                    break
                time.sleep(0.02)
            except OSError:  # a file system without flock
                break
        yield
    finally:
        os.close(fd)  # releases the flock


def _is_locked(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if "database is locked" in str(error) or "database table is locked" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def dvc_tags() -> dict[str, str]:
    """The DVC experiment a stage runs for, from the variables DVC sets (empty outside DVC)."""
    tags = {}
    for tag, variable in (
        ("dvc_exp_name", "DVC_EXP_NAME"),
        ("dvc_exp_baseline_rev", "DVC_EXP_BASELINE_REV"),
        ("dvc_root", "DVC_ROOT"),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def _under_dvc() -> bool:
    return bool(os.environ.get("DVC_ROOT") or os.environ.get("DVC_STAGE"))


def _pipeline_key(commit: str | None) -> tuple[str, str]:
    """``(key, run name)`` of the pipeline execution this stage belongs to: the DVC experiment
    (name and baseline), or for a plain ``dvc repro`` the commit and ``params.yaml``'s content."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return f"exp:{name}:{os.environ.get('DVC_EXP_BASELINE_REV', '')}", name
    try:
        digest = hashlib.sha256(Path("params.yaml").read_bytes()).hexdigest()[:16]
    except OSError:
        digest = "none"
    # Not the dirty flag: each stage rewrites the tracked dvc.lock.
    return f"repro:{commit or 'nogit'}:{digest}", f"repro@{(commit or 'nogit')[:7]}"


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
        self.parent_run_id: str | None = None
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

    def _store(self, action):
        """``action()`` under the store's lock, retried while SQLite says the database is locked."""
        for attempt in range(_LOCKED_RETRIES):
            try:
                with _store_lock(self.uri):
                    return action()
            except Exception as error:
                if attempt + 1 == _LOCKED_RETRIES or not _is_locked(error):
                    raise
                time.sleep(0.1 * 2**attempt)

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.config.experiment)
        if experiment is not None:
            return experiment.experiment_id
        # Artifacts next to the store, not under the working directory (MLflow's default), which
        # is a temporary copy for queued experiments.
        database = _sqlite_path(self.uri)
        location = (database.parent / "mlruns").resolve().as_uri() if database else None
        try:
            return self.client.create_experiment(self.config.experiment, location)
        except Exception:  # created meanwhile by another process (a server store)
            experiment = self.client.get_experiment_by_name(self.config.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        commit, dirty = git_commit()
        tags = {
            "mlflow.runName": self.stage,
            "stage": self.stage.split("@")[0],
            "dvc_stage": self.stage,
            "head": ",".join(self.heads),
            **dvc_tags(),
            **self.extra_tags,
        }
        if commit:
            tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
            tags["git_dirty"] = str(dirty).lower()
        # One locked section: the experiment, the parent and the run appear together or not at all.
        self._store(lambda: self._create_runs(tags, commit))

    def _create_runs(self, tags: dict[str, str], commit: str | None) -> None:
        from mlflow.entities import Param

        experiment_id = self._experiment_id()
        if _under_dvc():
            self.parent_run_id = self._parent_run(experiment_id, tags, commit)
            tags = {**tags, "mlflow.parentRunId": self.parent_run_id}
        run = self.client.create_run(experiment_id, tags=tags, run_name=self.stage)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(self.params).items()]
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + _BATCH])
        if self.parent_run_id is not None:
            self._log_parent_params(params)

    def _parent_run(self, experiment_id: str, tags: dict[str, str], commit: str | None) -> str:
        """The parent run of this pipeline execution (created by its first stage); RUNNING again."""
        key, name = _pipeline_key(commit)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.{PIPELINE_KEY_TAG} = '{key}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        parent_tags = {
            key_: value
            for key_, value in tags.items()
            if key_.startswith(("dvc_exp", "dvc_root", "git_", "mlflow.source"))
        }
        parent_tags.update({PIPELINE_KEY_TAG: key, "mlflow.runName": name, "stage": "pipeline"})
        return self.client.create_run(experiment_id, tags=parent_tags, run_name=name).info.run_id

    def _log_parent_params(self, params) -> None:
        """The stage's params on the parent too (the union over stages: one params.yaml). A param
        the parent already holds with another value (params.yaml edited between stages of one
        execution) is left as it is."""
        known = self.client.get_run(self.parent_run_id).data.params
        new = [p for p in params if p.key not in known]
        for start in range(0, len(new), _BATCH):
            try:
                self.client.log_batch(self.parent_run_id, params=new[start : start + _BATCH])
            except Exception as error:
                if _is_locked(error):
                    raise

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.run_id is None or self.client is None:
            return
        if exc_type is None and self.off_reason is None:
            status = "FINISHED"
        elif exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"

        def end() -> None:
            if exc is not None:
                self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            self.client.set_terminated(self.run_id, status)
            if self.parent_run_id is not None:  # the parent has the status of its latest stage
                self.client.set_terminated(self.parent_run_id, status)

        try:
            with _quiet_mlflow():
                self._store(end)
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
        finite = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        }
        entries = [Metric(metric_name(k), v, now, step or 0) for k, v in finite.items()]
        targets = [(self.run_id, entries)]
        if step is None and self.parent_run_id is not None:
            # A stage's final metrics also on the parent, so that one row compares experiments.
            prefix = self.stage
            targets.append(
                (
                    self.parent_run_id,
                    [Metric(metric_name(f"{prefix}/{k}"), v, now, 0) for k, v in finite.items()],
                )
            )
        self._guard(
            lambda: [
                self.client.log_batch(run_id, metrics=batch[i : i + 1000])
                for run_id, batch in targets
                for i in range(0, len(batch), 1000)
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

    def call(self, action, what: str) -> None:
        """``action(client, run_id)`` under the same guard as the logging methods (for callers that
        log something else, e.g. an MLflow model); a no-op once tracking is off."""
        if self.active:
            self._guard(lambda: action(self.client, self.run_id), what)

    # -- failures ----------------------------------------------------------------------------------

    def _guard(self, action, what: str) -> None:
        try:
            with _quiet_mlflow():
                self._store(action)
        except Exception as error:
            if self.run_id is not None:
                try:  # do not leave the run RUNNING when the store still answers
                    with _quiet_mlflow():
                        self._store(lambda: self.client.set_terminated(self.run_id, "FAILED"))
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
