"""Evaluation: metrics (:mod:`angular.eval.metrics`), temperature scaling
(:mod:`angular.eval.calibration`), ensemble rules (:mod:`angular.eval.ensemble`) and plots
(:mod:`angular.eval.plots`). Import the module you need; only ``plots`` imports matplotlib."""
