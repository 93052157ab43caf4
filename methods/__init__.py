"""One file per method, each registering itself with ``harness.models.register_method`` (timm's
``models/__init__.py`` style: importing this package imports every method module, in this order).
Files starting with ``_`` hold parts several methods share. ``get_method`` and ``method_names``
here see every registered method."""

from harness.models import MethodSpec, get_method, method_names
from methods import (  # noqa: F401 - each module registers its methods
    adapter,
    bitfit,
    frpt,
    full_finetune,
    linear_probe,
    lora,
    peft_tuners,
    ssf,
    vpt,
    vptsp_g,
)

__all__ = ["MethodSpec", "get_method", "method_names"]
