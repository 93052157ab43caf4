"""VPTSP-G (Ren et al., ICLR 2024; SPECS section 4): semantic proxies from class prompts.

``vptsp_g`` integrates the proxy observations with a GRU, ``vptsp_ema`` with an EMA.

Training step, following the official code (Noahsark/ParameterEfficient-DML):

1. Embedding path: frozen ViT with shared deep prompts (VPTSP-G placement: before CLS, stripped
   after each block) + head -> embeddings. This is also the only path at test time.
2. Proxy path: the same ViT with each sample's *class* prompts instead -> CLS -> separate
   ``proxy_head`` -> L2-normalised observation p.
3. Integration per class c in the batch, over its samples in batch order, starting from the
   stored container value: GRU ``h <- (1-z)*n + z*h`` (or EMA of the observations' mean), then
   renormalised -> h_c.
4. Proxies ``P = normalise(lambda*B + (1-lambda)*H)``, ``H_c = h_c`` for the batch's classes and the
   stored container for the others; Proxy Anchor loss of the embeddings against all C proxies.

Gradient flow (as in the code, where the container row is overwritten in-graph by the integrated
value and only detached for the next batch): the loss reaches B (all rows), and through h_c of the
batch's classes the integrator, the proxy head, the class prompts and the BitFit biases (second
pass); the stored container rows (other classes, and h's starting value) are constants. After the
optimizer step (:meth:`after_step`) h_c is written into the ``proxy_container`` buffer (saved with
the checkpoint).

Memory bank (``memory_bank: true``, the code's choice for SOP / In-Shop): the class prompts and
their optimizer state stay in host memory; the outer optimizer only sees ``proxy_class_slot``, one
row per class of a batch, filled before the forward pass and written back after the step without
the host ever waiting for the device (:mod:`methods._memory_bank`).

No step reads a device value on the host: the batch's grouping by class (which classes, how many
samples each, in which order) is computed on the host from the labels the sampler drew
(:meth:`VPTSPGModel.before_step`) and sent over in one non-blocking copy. Called without it (a
direct ``training_loss`` call, outside the loop), the grouping is computed on the device, which
costs two host syncs (``torch.unique`` and the largest count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.models import (
    BuildContext,
    DMLModel,
    EmbeddingHead,
    ProxyAnchorLoss,
    UserError,
    freeze,
    ranged,
    register_method,
    to_device,
)
from methods import _vptspg_recipes as vptspg_recipes
from methods._memory_bank import HostBank
from methods._vit import (
    check_plain_vit,
    embed_tokens,
    pool_tokens,
    resolve_depth,
    run_blocks,
    token_counts,
    xavier_normal_as,
)
from methods.bitfit import unfreeze_biases
from methods.vpt import PromptedViT, make_vit_prompts


@dataclass
class VPTSPGConfig:
    #: shared prompt tokens N; layer l gets max(N - l*prompt_block_step, 0)
    num_prompt: int = ranged(10, "> 0")
    #: blocks with shared prompts (0 = all)
    prompt_depth: int = 0
    prompt_block_step: int = ranged(0, ">= 0")
    #: class prompt tokens per class and layer; layer l gets max(N - l*class_prompt_block_step, 0)
    num_class_prompt: int = ranged(3, "> 0")
    #: blocks with class prompts in the proxy pass (0 = all)
    class_prompt_depth: int = 0
    class_prompt_block_step: int = ranged(0, ">= 0")
    #: lambda in P_c = normalise(lambda*B_c + (1-lambda)*h_c), B = learned proxy bias
    proxy_bias_ratio: float = ranged(0.5, "[0, 1]")
    #: learning rate of the proxy bias B (its own parameter group)
    lr_proxy: float = ranged(0.1, "> 0", finite=True)
    #: learning-rate schedule of the proxy-bias group (the code: cosine, same period)
    proxy_schedule: Literal["cosine", "constant"] = "cosine"
    #: dropout on the GRU's output at each integration step, before it reaches the container
    #: (the code's rnn_dropout: SOP and In-Shop 0.1, CUB and Cars 0)
    rnn_dropout: float = ranged(0.0, "[0, 1)")
    #: also train every backbone bias (BitFit), as in all published configs
    bitfit: bool = True
    #: keep class prompts and their optimizer state on the CPU, swapping in the batch's classes
    memory_bank: bool = False


@dataclass
class VPTSPEMAConfig(VPTSPGConfig):
    #: EMA momentum m: container[c] <- m*container[c] + (1-m)*(mean observation of c in the batch)
    ema_momentum: float = ranged(0.8, "[0, 1)")


class GRUIntegrator(nn.Module):
    """GRU cell of the paper (ReLU candidate): h <- dropout((1-z)*n + z*h), as the code's
    ``Simple_GRUCell`` (dropout ``rnn_dropout`` on every step's output)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        for gate in ("z", "r", "n"):
            self.register_parameter(f"W_{gate}", nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, dim))))
            self.register_parameter(f"U_{gate}", nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, dim))))
            self.register_parameter(f"b_{gate}", nn.Parameter(torch.zeros(dim)))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(x @ self.W_z + h @ self.U_z + self.b_z)
        r = torch.sigmoid(x @ self.W_r + h @ self.U_r + self.b_r)
        n = torch.relu(x @ self.W_n + r * (h @ self.U_n) + self.b_n)
        return self.dropout((1 - z) * n + z * h)


@dataclass
class Grouping:
    """A batch grouped by class, on the device: ``classes`` (sorted), each sample's row in
    ``classes`` (``rows``), the samples in class order (``order``) with their class row
    (``sorted_rows``) and rank within the class (``rank``), the count per class and the largest."""

    classes: torch.Tensor
    rows: torch.Tensor
    order: torch.Tensor
    sorted_rows: torch.Tensor
    rank: torch.Tensor
    counts: torch.Tensor
    width: int
    host_classes: np.ndarray | None = None


def host_grouping(labels: np.ndarray, device: torch.device) -> Grouping:
    """The grouping computed on the host and sent over in one non-blocking copy: no sync."""
    classes, rows, counts = np.unique(np.asarray(labels, np.int64), return_inverse=True, return_counts=True)
    rows = rows.reshape(-1)
    order = np.argsort(rows, kind="stable")
    rank = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows[order]]
    parts = [classes, rows, order, rows[order], rank, counts]
    packed = to_device(np.concatenate(parts).astype(np.int64), device)
    split = packed.split([len(p) for p in parts])
    return Grouping(*split, width=int(counts.max()), host_classes=classes)


def device_grouping(labels: torch.Tensor) -> Grouping:
    """The same grouping computed on the device (``torch.unique``, the largest count: two syncs)."""
    classes, rows, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(rows, stable=True)
    rank = torch.arange(len(labels), device=labels.device) - (torch.cumsum(counts, 0) - counts)[rows[order]]
    return Grouping(classes, rows, order, rows[order], rank, counts, width=int(counts.max()))


def group_by_class(values: torch.Tensor, g: Grouping) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_class, mask)``: per_class[u, t] = the t-th sample of class u in batch order."""
    per_class = values.new_zeros(len(g.classes), g.width, values.shape[-1])
    per_class = per_class.index_put((g.sorted_rows, g.rank), values[g.order])
    mask = torch.arange(g.width, device=values.device) < g.counts[:, None]
    return per_class, mask


class VPTSPGModel(PromptedViT):
    """Shared-prompt ViT (inference path) plus the class-prompt proxy path used in training."""

    def __init__(
        self,
        backbone,
        head: EmbeddingHead,
        criterion: ProxyAnchorLoss,
        *,
        prompts: nn.ParameterList,
        class_prompts: list[torch.Tensor],
        proxy_head: EmbeddingHead,
        integrator: GRUIntegrator | None,
        cfg: VPTSPGConfig,
        slot_rows: int,
    ) -> None:
        super().__init__(backbone, head, criterion, prompts=prompts, mode="vptspg", dropout=0.0)
        num_classes, dim = criterion.num_classes, head.out_dim
        self.cfg = cfg
        self.memory_bank = cfg.memory_bank
        self.proxy_head = proxy_head
        self.proxy_integrator = integrator
        self.proxy_bias = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_classes, dim)) / 8.0)
        self.register_buffer(
            "proxy_container", F.normalize(nn.init.xavier_uniform_(torch.empty(num_classes, dim)), dim=1)
        )
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._grouping: Grouping | None = None  # the batch's, from before_step
        if not self.memory_bank:
            self.proxy_class_prompts = nn.ParameterList([nn.Parameter(t) for t in class_prompts])
            return
        # memory bank: host tensors kept out of the module tree, so model.to(device) leaves them
        self._bank = HostBank(class_prompts)
        self.proxy_class_slot = nn.ParameterList(
            [nn.Parameter(torch.zeros(slot_rows, t.shape[1], t.shape[2])) for t in class_prompts]
        )

    # ------------------------------------------------------------------ proxy path
    def before_step(self, optimizer: torch.optim.Optimizer | None, labels: np.ndarray) -> None:
        """The batch's grouping by class from its host labels; the memory bank loads its rows."""
        device = self.proxy_container.device
        self._grouping = host_grouping(labels, device)
        if self.memory_bank:
            classes = self._grouping.host_classes
            slots = self.proxy_class_slot[0].shape[0]
            if len(classes) > slots:
                raise ValueError(f"batch holds {len(classes)} classes, the memory-bank slot only {slots}")
            self._bank.load(self.proxy_class_slot, optimizer, classes)

    def grouping(self, labels: torch.Tensor) -> Grouping:
        """This batch's grouping: from :meth:`before_step` (used once), else computed on the device."""
        g, self._grouping = self._grouping, None
        if g is not None:
            return g
        if self.memory_bank:
            raise RuntimeError(
                "memory bank: call before_step(optimizer, host labels) before training_loss "
                "(the training loop does), so the batch's rows are loaded"
            )
        return device_grouping(labels)

    def class_layer_prompts(self, labels: torch.Tensor, g: Grouping) -> list[torch.Tensor]:
        """Each sample's class prompts per layer, ``(B, n_l, D)``."""
        if not self.memory_bank:
            return [p[labels] for p in self.proxy_class_prompts]
        return [slot[g.rows] for slot in self.proxy_class_slot]

    def proxy_observations(self, images: torch.Tensor, labels: torch.Tensor, g: Grouping) -> torch.Tensor:
        """Second pass with class prompts in place of the shared ones -> normalised proxy head output."""
        tokens = embed_tokens(self.backbone, images)
        tokens = run_blocks(self.backbone, tokens, self.class_layer_prompts(labels, g), "vptspg")
        return F.normalize(self.proxy_head(pool_tokens(self.backbone, tokens)).float(), dim=-1)

    def integrate(self, observations: torch.Tensor, g: Grouping) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes, h)``: each batch class's container value updated by its observations, renormalised."""
        classes = g.classes
        per_class, mask = group_by_class(observations, g)
        h = self.proxy_container[classes]
        if self.proxy_integrator is not None:
            for t in range(per_class.shape[1]):
                h = torch.where(mask[:, t, None], self.proxy_integrator(per_class[:, t], h), h)
        else:
            m = self.cfg.ema_momentum
            mean = per_class.sum(1) / mask.sum(1, keepdim=True)
            h = m * h + (1 - m) * mean
        return classes, F.normalize(h.float(), dim=-1)

    def proxies(self, classes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """All C proxies: normalise(lambda*B + (1-lambda)*H), H = container with the batch rows = h."""
        lam = self.cfg.proxy_bias_ratio
        container = self.proxy_container.index_copy(0, classes, h)
        return F.normalize(lam * self.proxy_bias + (1 - lam) * container, dim=-1)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.grouping(labels)
        embeddings = self.head(self.features(images))
        classes, h = self.integrate(self.proxy_observations(images, labels, g), g)
        self._pending = (classes, h.detach())
        return self.criterion(embeddings, labels, proxies=self.proxies(classes, h)), {}

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write the batch's integrated values into the container (detached: the next step starts
        there); the memory bank starts copying the batch's updated rows back to the host."""
        if self._pending is not None:
            classes, h = self._pending
            self.proxy_container[classes] = h.to(self.proxy_container.dtype)
            self._pending = None
        if self.memory_bank:
            self._bank.save(self.proxy_class_slot, optimizer)

    # ------------------------------------------------------------------ optimisation
    def role_of(self, name: str) -> str:
        return "proxy_bias" if name == "proxy_bias" else super().role_of(name)

    def param_groups(self, optim_cfg: Any, loss_cfg: Any) -> list[dict[str, Any]]:
        """Default groups plus the proxy bias with its own lr (lr_proxy) and schedule."""
        groups = super().param_groups(optim_cfg, loss_cfg)
        for g in groups:
            if g["role"] == "proxy_bias":
                g["lr"], g["schedule"] = self.cfg.lr_proxy, self.cfg.proxy_schedule
        return groups

    # ------------------------------------------------------------------ memory bank state
    def resume_state(self) -> dict[str, Any]:
        if not self.memory_bank:  # on the device the optimizer's own state holds every row
            return {}
        state = self._bank.synced().state
        return {"bank_state": [{k: v.clone() for k, v in layer.items()} for layer in state]}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        if self.memory_bank and "bank_state" in state:
            self._bank.replace(state=state["bank_state"])

    def class_prompt_values(self) -> list[torch.Tensor]:
        """Current class prompts per layer ``(C, n_l, D)``, wherever they live."""
        if self.memory_bank:
            return list(self._bank.synced().values)
        return [p.detach() for p in self.proxy_class_prompts]

    def count_parameters(self) -> dict[str, int]:
        counts = super().count_parameters()
        if self.memory_bank:  # count the bank, not the slot
            delta = sum(b.numel() for b in self._bank.values) - sum(s.numel() for s in self.proxy_class_slot)
            counts["params/trainable"] += delta
            counts["params/total"] += delta
        return counts

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state_dict()
        if self.memory_bank:  # same keys as on-device mode, so checkpoints are interchangeable
            state = {k: v for k, v in state.items() if not k.startswith("proxy_class_slot")}
            state.update({f"proxy_class_prompts.{i}": b for i, b in enumerate(self._bank.synced().values)})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.memory_bank:
            state = dict(state)
            keys = [f"proxy_class_prompts.{i}" for i in range(len(self._bank.values))]
            if any(k in state for k in keys):
                self._bank.replace(
                    values=[state.pop(k) if k in state else v.clone() for k, v in zip(keys, self._bank.synced().values)]
                )
        super().load_trainable_state_dict(state)


# ---------------------------------------------------------------------------- builders


def _check(cfg: VPTSPGConfig, ctx: BuildContext) -> None:
    """VPTSP-G's loss is Proxy Anchor (its options' ranges are on VPTSPGConfig's fields)."""
    if ctx.cfg.loss.name != "proxy_anchor":
        raise UserError(f"bad value {ctx.cfg.loss.name!r} for 'loss.name': VPTSP-G trains with proxy_anchor")


def build_vptsp(ctx: BuildContext, cfg: VPTSPGConfig, integration: str, method: str) -> VPTSPGModel:
    """Shared builder of ``vptsp_g`` (GRU) and ``vptsp_ema`` (EMA)."""
    _check(cfg, ctx)
    vit = check_plain_vit(ctx.backbone.model, method)
    freeze(vit)
    if cfg.bitfit:
        unfreeze_biases(vit)
    depth = resolve_depth(cfg.prompt_depth, vit, "prompt_depth")
    counts = [n for n in token_counts(cfg.num_prompt, depth, cfg.prompt_block_step) if n > 0]
    prompts = make_vit_prompts(vit, counts, "vptspg")
    c_depth = resolve_depth(cfg.class_prompt_depth, vit, "class_prompt_depth")
    c_counts = [n for n in token_counts(cfg.num_class_prompt, c_depth, cfg.class_prompt_block_step) if n > 0]
    class_prompts = [xavier_normal_as((ctx.num_classes, cfg.num_class_prompt, vit.embed_dim), n) for n in c_counts]

    head, proxy_head = ctx.head(), ctx.head()
    dim = head.out_dim
    loss = ctx.cfg.loss  # loss.positive_average: one key for every Proxy Anchor method
    criterion = ProxyAnchorLoss(
        ctx.num_classes, dim, alpha=loss.alpha, margin=loss.margin, positive_average=loss.positive_average
    )
    criterion.register_parameter("proxies", None)  # VPTSP-G passes its own proxies every step
    integrator = GRUIntegrator(dim, cfg.rnn_dropout) if integration == "gru" else None
    data = ctx.cfg.data
    slot_rows = data.batch_size // data.samples_per_class if data.samples_per_class else data.batch_size
    return VPTSPGModel(
        ctx.backbone,
        head,
        criterion,
        prompts=prompts,
        class_prompts=class_prompts,
        proxy_head=proxy_head,
        integrator=integrator,
        cfg=cfg,
        slot_rows=slot_rows,
    )


_SEARCH = {
    "optim.weight_decay": None,  # the published configs barely use it (0 to 1e-4); tune the proxies instead
    "method_args.lr_proxy": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
    "method_args.proxy_bias_ratio": {"type": "float", "low": 0.1, "high": 0.9},
}
#: shared prompts (inference path) and the proxy path (training only); biases train (BitFit)
_DECLARED = {
    "families": ("vit",),
    "prefixes": ("prompt_", "proxy_"),
    "training_only": ("proxy_",),
    "backbone": "biases",
    "search_space": _SEARCH,
    "defaults": {"loss.name": "proxy_anchor"},
}


@register_method(
    "vptsp_g", display="VPTSP-G", config=VPTSPGConfig, presets=vptspg_recipes.presets("vptsp_g"), **_DECLARED
)
def vptsp_g(ctx: BuildContext, cfg: VPTSPGConfig) -> DMLModel:
    """VPTSP-G: shared prompts + semantic proxies from class prompts, integrated by a GRU."""
    return build_vptsp(ctx, cfg, "gru", "vptsp_g")


@register_method(
    "vptsp_ema",
    display="VPTSP-G (EMA)",
    config=VPTSPEMAConfig,
    presets=vptspg_recipes.presets("vptsp_ema"),
    **_DECLARED,
)
def vptsp_ema(ctx: BuildContext, cfg: VPTSPEMAConfig) -> DMLModel:
    """VPTSP-G with the paper's EMA integration of the semantic proxies instead of the GRU."""
    return build_vptsp(ctx, cfg, "ema", "vptsp_ema")
