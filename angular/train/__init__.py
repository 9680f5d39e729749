"""Training: one trainer for one process or many (:mod:`angular.train.loop`, whose docstring maps the
modules: epoch, checkpoint, world, session), the prioritized sampler, the collapse watch and MLflow
tracking (:mod:`angular.train.tracking`). Import the module you need; this package imports none."""
