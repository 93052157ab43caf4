"""Reports regenerated from MLflow alone: tables, published numbers, figures and the DPP/CAM figures."""
