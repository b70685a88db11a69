"""Training, the random hyper-parameter search and the reproduction of the abstract's study.

Entry points: ``python -m model_training.train`` (also ``kmotion train``) and
``python -m model_training.search``.
"""
