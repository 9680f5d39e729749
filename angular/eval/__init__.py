"""Evaluation as a library (docs/design.md, Pipeline: calibrate and evaluate).

Metrics by kind: :mod:`~angular.eval.classification` (softmax, top-1),
:mod:`~angular.eval.calibration` (NLL, Brier, ECE, temperature scaling), :mod:`~angular.eval.roc`, :mod:`~angular.eval.open_set`,
:mod:`~angular.eval.pairs` (drawn pairs, LFW pairs files) and :mod:`~angular.eval.verification`
(LFW protocol), :mod:`~angular.eval.bins` (insightface's protocol for its ``.bin`` sets; running a
model on them is :mod:`angular.train.bins`) and :mod:`~angular.eval.templates` (IJB-B/C style
template verification and its protocol files), on the input checks of
:mod:`~angular.eval.checks`; :mod:`~angular.eval.metrics` re-exports them all. :mod:`~angular.eval.ensemble` combines heads; :mod:`~angular.eval.evaluate`
turns trained models' outputs into the evaluate stage's metrics, :mod:`~angular.eval.report` into
its table; :mod:`~angular.eval.plots` draws (the only module that imports matplotlib). Import the
module you need."""
