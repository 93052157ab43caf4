"""The core: config schema and resolution, method registry, model, losses, metrics, backbones and the training loop."""
