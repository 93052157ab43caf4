"""MLflow: the tracking store (URI, experiments, environment tags, retried writes), dataset inputs,
run artifacts, UI links and views, comparing runs. It stands on config and data only."""
