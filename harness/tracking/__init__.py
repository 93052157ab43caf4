"""MLflow: the tracking store (URI, experiments, environment tags) and run artifacts."""
