"""Evaluation: the standard benchmarks with their metrics (`run`, `tasks`, `metrics`: ``llava-uhd eval``), the
paper's pilot experiments as probes (``llava-uhd probe``), an lmms-eval model adapter (`lmms_adapter`), and the
project's synthetic questions scored per kind (`synthetic_eval`) with the accuracy tables runs report them in
(`reporting`). ``eval`` may import ``serve``; ``serve`` never imports ``eval``."""
