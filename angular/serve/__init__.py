"""Using trained models: running them on images (:mod:`angular.serve.inference`) and the
``angular predict`` / ``angular embed`` library (:mod:`angular.serve.predict`)."""
