"""Recipes of the VPTSP-G comparison set: each dataset's settings as the released code runs them.

Source: Noahsark/ParameterEfficient-DML, ``config/<dataset>_small.yaml`` (ViT-S/16 in21k, the
published ViT-S numbers: presets ``cub``, ``cars``, ``sop``, ``inshop``) and
``config/<dataset>_basic.yaml`` (ViT-B/16 in21k: presets ``cub_b``, ``cars_b``, ``sop_b``,
``inshop_b``, ``inaturalist_b``) with ``params.py``'s defaults for keys a config leaves out, and
the training script ``main.py``. Every method of the comparison set (full fine-tune, linear probe,
BitFit, adapter, VPT, VPTSP-G) runs with the same dataset settings; the code switches methods by
flags (``--full_fine_tune``, ``--vit_head``, ``--vit_bitfit``, ``--adapter``, ``--vit_prompt``,
``--vit_proxy_net``), which :func:`method_overrides` translates.

What the code does for every method, and the recipe therefore sets:

- Proxy Anchor with alpha 32, margin 0.1, the positive term averaged over all C proxies
  (``criteria/dml_proxy_peft.py``: ``pos_s.mean()``);
- proxies ``proxies_bias`` initialised xavier-uniform / 8, trained with ``lr_proxy`` in their
  own optimiser and schedule (``p_optimizer``, ``p_scheduler``), weight decay as the rest;
- heads: LayerNorm + Linear, the Linear xavier-uniform with zero bias (``_init_weights``);
- ``CosineAnnealingLR(T_max=lr_cosine_length, eta_min=lr_cosine_min)`` stepped once per epoch,
  no warmup, no gradient clipping, fp16 with a GradScaler (``optim.amp=fp16``), RandomResizedCrop(224) + flip on the
  original JPEG, Resize(256) + CenterCrop(224) at test;
- the adapter with a LayerNorm after its up-projection (``adapter_ln_position='post'``).

Known departure kept: the code's adapter block hard-codes 12 heads and no qkv bias, which we do
not copy (SPECS 2).
"""

from __future__ import annotations

from typing import Any

REPO = "Noahsark/ParameterEfficient-DML"

#: per dataset: (config file, optimiser, lr, weight decay, epochs, lr_cosine_length, lr_cosine_min,
#: batch size, samples per class, lr_proxy), transcribed from the released configs
DATASETS: dict[str, dict[str, Any]] = {
    "cub": {
        "config": "config/cub200_small.yaml",
        "dataset": "cub200",
        "optim": "sgd",
        "lr": 5e-3,
        "weight_decay": 1e-6,
        "epochs": 15,
        "cosine_epochs": 50,
        "min_lr": 1e-8,
        "batch": 64,
        "k": 2,
        "lr_proxy": 0.1,
    },
    # lr_cosine_length is not in cars_small.yaml: params.py's default, 50
    "cars": {
        "config": "config/cars_small.yaml",
        "dataset": "cars196",
        "optim": "adamw",
        "lr": 5e-4,
        "weight_decay": 0.0,
        "epochs": 50,
        "cosine_epochs": 50,
        "min_lr": 1e-6,
        "batch": 64,
        "k": 2,
        "lr_proxy": 0.01,
    },
    "sop": {
        "config": "config/sop_small.yaml",
        "dataset": "sop",
        "optim": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "epochs": 120,
        "cosine_epochs": 120,
        "min_lr": 5e-5,
        "batch": 32,
        "k": 1,
        "lr_proxy": 0.05,
    },
    "inshop": {
        "config": "config/inshop_small.yaml",
        "dataset": "inshop",
        "optim": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-7,
        "epochs": 80,
        "cosine_epochs": 100,
        "min_lr": 5e-6,
        "batch": 32,
        "k": 1,
        "lr_proxy": 0.05,
    },
    # ViT-B/16 (config/*_basic.yaml); missing decay: 0, missing lr_cosine_length: 50
    "cub_b": {
        "config": "config/cub200_basic.yaml",
        "dataset": "cub200",
        "optim": "sgd",
        "lr": 1e-3,
        "weight_decay": 1e-6,
        "epochs": 60,
        "cosine_epochs": 100,
        "min_lr": 1e-7,
        "batch": 64,
        "k": 2,
        "lr_proxy": 0.01,
    },
    "cars_b": {
        "config": "config/cars_basic.yaml",
        "dataset": "cars196",
        "optim": "adamw",
        "lr": 5e-4,
        "weight_decay": 0.0,
        "epochs": 60,
        "cosine_epochs": 50,
        "min_lr": 1e-6,
        "batch": 64,
        "k": 2,
        "lr_proxy": 0.01,
    },
    "sop_b": {
        "config": "config/sop_basic.yaml",
        "dataset": "sop",
        "optim": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "epochs": 120,
        "cosine_epochs": 120,
        "min_lr": 1e-7,
        "batch": 32,
        "k": 1,
        "lr_proxy": 0.05,
    },
    "inshop_b": {
        "config": "config/inshop_basic.yaml",
        "dataset": "inshop",
        "optim": "adamw",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "epochs": 75,
        "cosine_epochs": 100,
        "min_lr": 1e-6,
        "batch": 32,
        "k": 1,
        "lr_proxy": 0.05,
    },
    "inaturalist_b": {
        "config": "config/inaturalist_basic.yaml",
        "dataset": "inaturalist",
        "optim": "adamw",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "epochs": 40,
        "cosine_epochs": 50,
        "min_lr": 1e-6,
        "batch": 64,
        "k": 1,
        "lr_proxy": 0.05,
    },
}

#: per dataset, the prompt settings of the configs: shared prompts (num_prompt, prompt_depth,
#: prompt_block_step), class prompts (num_p_prompt, p_prompt_depth, prompt_p_block_step),
#: proxy_bias_ratio, rnn_dropout and the memory bank (SOP, In-Shop: LARGE_DATASETS in main.py)
PROMPTS: dict[str, dict[str, Any]] = {
    "cub": {
        "num_prompt": 10,
        "prompt_depth": 12,
        "prompt_block_step": 0,
        "num_class_prompt": 3,
        "class_prompt_depth": 12,
        "class_prompt_block_step": 0,
        "proxy_bias_ratio": 0.5,
        "rnn_dropout": 0.0,
        "memory_bank": False,
    },
    "cars": {
        "num_prompt": 80,
        "prompt_depth": 11,
        "prompt_block_step": 2,
        "num_class_prompt": 50,
        "class_prompt_depth": 8,
        "class_prompt_block_step": 2,
        "proxy_bias_ratio": 0.7,
        "rnn_dropout": 0.0,
        "memory_bank": False,
    },
    "sop": {
        "num_prompt": 90,
        "prompt_depth": 12,
        "prompt_block_step": 0,
        "num_class_prompt": 5,
        "class_prompt_depth": 12,
        "class_prompt_block_step": 0,
        "proxy_bias_ratio": 0.2,
        "rnn_dropout": 0.1,
        "memory_bank": True,
    },
    "inshop": {
        "num_prompt": 90,
        "prompt_depth": 12,
        "prompt_block_step": 0,
        "num_class_prompt": 80,
        "class_prompt_depth": 12,
        "class_prompt_block_step": 0,
        "proxy_bias_ratio": 0.2,
        "rnn_dropout": 0.1,
        "memory_bank": True,
    },
    "cub_b": {
        "num_prompt": 20,
        "prompt_depth": 12,
        "prompt_block_step": 0,
        "num_class_prompt": 5,
        "class_prompt_depth": 4,
        "class_prompt_block_step": 5,
        "proxy_bias_ratio": 0.4,
        "rnn_dropout": 0.0,
        "memory_bank": False,
    },
    "cars_b": {
        "num_prompt": 80,
        "prompt_depth": 10,
        "prompt_block_step": 2,
        "num_class_prompt": 50,
        "class_prompt_depth": 8,
        "class_prompt_block_step": 2,
        "proxy_bias_ratio": 0.1,
        "rnn_dropout": 0.0,
        "memory_bank": False,
    },
    "sop_b": {
        "num_prompt": 90,
        "prompt_depth": 12,
        "prompt_block_step": 5,
        "num_class_prompt": 5,
        "class_prompt_depth": 8,
        "class_prompt_block_step": 0,
        "proxy_bias_ratio": 0.2,
        "rnn_dropout": 0.5,
        "memory_bank": True,
    },
    "inshop_b": {
        "num_prompt": 90,
        "prompt_depth": 12,
        "prompt_block_step": 0,
        "num_class_prompt": 60,
        "class_prompt_depth": 12,
        "class_prompt_block_step": 0,
        "proxy_bias_ratio": 0.3,
        "rnn_dropout": 0.0,
        "memory_bank": True,
    },
    "inaturalist_b": {
        "num_prompt": 90,
        "prompt_depth": 12,
        "prompt_block_step": 5,
        "num_class_prompt": 10,
        "class_prompt_depth": 12,
        "class_prompt_block_step": 0,
        "proxy_bias_ratio": 0.2,
        "rnn_dropout": 0.0,
        "memory_bank": True,
    },
}

#: the flags by which the code selects each method
FLAGS = {
    "full_finetune": "--full_fine_tune --vit_head",
    "linear_probe": "--vit_head",
    "bitfit": "--vit_bitfit --vit_head",
    "adapter": "--adapter --vit_head",
    "vpt_shallow": "--vit_prompt --vit_head --prompt_depth 1",
    "vpt_deep": "--vit_prompt --vit_head",
    "vptsp_g": "--vit_prompt --vit_bitfit --vit_head --vit_proxy_net (semantic_mix_type gru_relu)",
    "vptsp_ema": "--vit_prompt --vit_bitfit --vit_head --vit_proxy_net (semantic_mix_type mix)",
}


def dataset_overrides(name: str) -> dict[str, Any]:
    """Run-config overrides every method shares on dataset ``name``."""
    d = DATASETS[name]
    base = name.endswith("_b")
    return {
        # current timm names of the code's vit_{small,base}_patch16_224_in21k
        "backbone": "vit_base_patch16_224.augreg_in21k" if base else "vit_small_patch16_224.augreg_in21k",
        "model.embed_dim": 512 if base else 384,
        "model.head_init": "xavier",
        "optim.name": d["optim"],
        "optim.lr": d["lr"],
        "optim.weight_decay": d["weight_decay"],
        "optim.momentum": 0.9,
        "optim.epochs": d["epochs"],
        "optim.cosine_epochs": d["cosine_epochs"],
        "optim.min_lr": d["min_lr"],
        "optim.schedule": "cosine",
        "optim.schedule_unit": "epoch",
        "optim.warmup_epochs": 0.0,
        "optim.grad_clip": 0.0,
        "optim.amp": "fp16",
        "optim.head_lr_mult": 1.0,
        "data.batch_size": d["batch"],
        "data.samples_per_class": d["k"],
        "data.augment": "standard",
        "data.image_size": 224,
        "data.resize_size": 256,
        "data.test_resize": "short",
        "loss.name": "proxy_anchor",
        "loss.alpha": 32.0,
        "loss.margin": 0.1,
        "loss.positive_average": "all",
        "loss.proxy_init": "xavier_div8",
        "loss.proxy_lr": d["lr_proxy"],
    }


def method_overrides(method: str, name: str) -> dict[str, Any]:
    """The method's own settings on dataset ``name``, as the code's flags give them."""
    p = PROMPTS[name]
    if method == "adapter":
        return {
            "method_args.bottleneck": 64,
            "method_args.scale": 1.0,
            "method_args.style": "parallel",
            "method_args.layernorm": "post",
            "method_args.blocks": [],
        }
    if method in ("vpt_shallow", "vpt_deep"):
        out = {"method_args.variant": "vptspg", "method_args.num_prompts": p["num_prompt"]}
        if method == "vpt_deep":
            out.update({"method_args.depth": p["prompt_depth"], "method_args.block_step": p["prompt_block_step"]})
        return out
    if method in ("vptsp_g", "vptsp_ema"):
        keys = (
            "num_prompt",
            "prompt_depth",
            "prompt_block_step",
            "num_class_prompt",
            "class_prompt_depth",
            "class_prompt_block_step",
            "proxy_bias_ratio",
            "rnn_dropout",
            "memory_bank",
        )
        out = {f"method_args.{k}": p[k] for k in keys if not (method == "vptsp_ema" and k == "rnn_dropout")}
        # VPTSP-G's proxies are its proxy_bias (own lr, method_args.lr_proxy): loss.proxy_lr is unused
        out["method_args.lr_proxy"] = DATASETS[name]["lr_proxy"]
        out["method_args.bitfit"] = True
        return out
    return {}


def presets(method: str) -> dict[str, dict[str, Any]]:
    """``{dataset: overrides}`` for ``method``, each with its recorded source."""
    out = {}
    for name, d in DATASETS.items():
        source = f"{REPO} {d['config']} + params.py defaults + main.py; flags {FLAGS[method]}"
        out[name] = {
            **dataset_overrides(name),
            **method_overrides(method, name),
            "dataset": d["dataset"],
            "recipe_source": source,
        }
    return out
