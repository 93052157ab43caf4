"""What methods build with: backbones, the model class, injection, losses and the method registry."""
