"""What a method builds with: the public method API (every file in ``methods/`` imports from here
and from torch, timm or peft only, never from a deeper harness module).

- the model: :class:`DMLModel` (backbone + method modules + head + criterion; subclass it to
  change the forward pass), :class:`BuildContext` (what a builder receives), :class:`EmbeddingHead`,
  :func:`freeze`;
- registering: :func:`register_method`;
- modules inside the backbone: :class:`Injection`, :class:`MergeableModel`, :func:`block_targets`,
  :func:`select_indices`;
- :class:`ProxyAnchorLoss` (methods that bring their own proxies), :class:`Backbone`;
- options' ranges: :func:`ranged`; bad input: :class:`UserError`; host values onto the device
  without a sync: :func:`to_device`.

Below it stand only :mod:`harness.config`, :mod:`harness.runtime` and :mod:`harness.errors`. The
method lookups (:func:`get_method`, :func:`method_names`) see every method once the ``methods``
package is imported, which is why the layers above import them from ``methods``.
"""

from harness.config.rules import ranged
from harness.errors import UserError
from harness.models.backbones import Backbone, backbone_from, create_backbone
from harness.models.inject import Injection, MergeableModel, block_targets, select_indices
from harness.models.losses import ProxyAnchorLoss
from harness.models.model import BuildContext, DMLModel, EmbeddingHead, freeze
from harness.models.registry import MethodSpec, get_method, method_names, register_method
from harness.runtime import to_device

__all__ = [
    "Backbone",
    "BuildContext",
    "DMLModel",
    "EmbeddingHead",
    "Injection",
    "MergeableModel",
    "ProxyAnchorLoss",
    "UserError",
    "block_targets",
    "freeze",
    "ranged",
    "register_method",
    "select_indices",
    "to_device",
    # for the layers above (methods import none of these)
    "MethodSpec",
    "backbone_from",
    "create_backbone",
    "get_method",
    "method_names",
]
