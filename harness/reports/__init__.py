"""Reports regenerated from MLflow alone: tables, published numbers, figures, and the figures of
single runs (DPP, CAM). It stands on studies (their specs and storage), training (to rebuild a
run's model), tracking and the layers below; only the command line imports it."""
