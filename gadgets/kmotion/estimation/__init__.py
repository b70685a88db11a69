"""Motion estimators: the network (shipped estimator) and the classical registration baseline."""
