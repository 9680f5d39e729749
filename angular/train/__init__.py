"""Training: the loop with checkpoints and resume (:mod:`angular.train.loop`) and MLflow tracking
(:mod:`angular.train.tracking`). Import the module you need; this package imports none of them."""
