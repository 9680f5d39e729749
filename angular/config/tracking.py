"""The ``tracking`` section: MLflow."""

from angular.config.rules import Section, flag, text


class TrackingConfig(Section):
    """``tracking``: MLflow (not a parameter of any stage)."""

    enabled: flag()
    uri: text(optional=True)  # None: $MLFLOW_TRACKING_URI, else the SQLite store in the project
    experiment: text()
    required: flag()
    # The evaluate stage registers its best model under this name in MLflow's model registry
    # (None: no registration).
    register_model: text(optional=True) = None
