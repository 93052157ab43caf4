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
their optimizer state stay on the CPU. The outer optimizer only sees ``proxy_class_slot``, one row
per class of a batch: before the forward the batch's rows are copied in; global optimizer step
hooks swap the matching rows of the optimizer's state (momentum / Adam moments; the shared step
count stays the optimizer's) in before ``step()`` and copy values and state back out after it.
Classes absent from a batch are not touched ("lazy" update: no momentum or weight-decay drift,
as in the code); with every class in every batch it equals the on-device update exactly.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.losses import ProxyAnchorLoss
from harness.core.model import BuildContext, DMLModel, EmbeddingHead, freeze
from harness.core.registry import register_method
from harness.errors import UserError
from methods import _vptspg_recipes as vptspg_recipes
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
    num_prompt: int = 10
    #: blocks with shared prompts (0 = all)
    prompt_depth: int = 0
    prompt_block_step: int = 0
    #: class prompt tokens per class and layer; layer l gets max(N - l*class_prompt_block_step, 0)
    num_class_prompt: int = 3
    #: blocks with class prompts in the proxy pass (0 = all)
    class_prompt_depth: int = 0
    class_prompt_block_step: int = 0
    #: lambda in P_c = normalise(lambda*B_c + (1-lambda)*h_c), B = learned proxy bias
    proxy_bias_ratio: float = 0.5
    #: learning rate of the proxy bias B (its own parameter group)
    lr_proxy: float = 0.1
    #: learning-rate schedule of the proxy-bias group (the code: cosine, same period)
    proxy_schedule: Literal["cosine", "constant"] = "cosine"
    #: dropout on the GRU's output at each integration step, before it reaches the container
    #: (the code's rnn_dropout: SOP and In-Shop 0.1, CUB and Cars 0)
    rnn_dropout: float = 0.0
    #: also train every backbone bias (BitFit), as in all published configs
    bitfit: bool = True
    #: keep class prompts and their optimizer state on the CPU, swapping in the batch's classes
    memory_bank: bool = False


@dataclass
class VPTSPEMAConfig(VPTSPGConfig):
    #: EMA momentum m: container[c] <- m*container[c] + (1-m)*(mean observation of c in the batch)
    ema_momentum: float = 0.8


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


def group_by_class(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(classes, per_class, mask)``: per_class[u, t] = t-th sample of class u in batch order."""
    classes, inverse, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels), device=labels.device) - starts[inverse[order]]
    per_class = values.new_zeros(len(classes), int(counts.max()), values.shape[-1])
    per_class = per_class.index_put((inverse[order], rank), values[order])
    mask = torch.arange(per_class.shape[1], device=labels.device) < counts[:, None]
    return classes, per_class, mask


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
        self.register_buffer("proxy_container", F.normalize(nn.init.xavier_uniform_(torch.empty(num_classes, dim)), dim=1))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.memory_bank:
            self.proxy_class_prompts = nn.ParameterList([nn.Parameter(t) for t in class_prompts])
            return
        # memory bank: CPU tensors kept out of the module tree, so model.to(device) leaves them
        self._bank = [t.contiguous() for t in class_prompts]
        self._bank_state: list[dict[str, torch.Tensor]] = [{} for _ in class_prompts]
        self.proxy_class_slot = nn.ParameterList(
            [nn.Parameter(torch.zeros(slot_rows, t.shape[1], t.shape[2])) for t in class_prompts]
        )
        self._slot_classes = torch.zeros(0, dtype=torch.long)
        _BANK_MODELS.add(self)
        _install_optimizer_hooks()

    # ------------------------------------------------------------------ proxy path
    def class_layer_prompts(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's class prompts per layer, ``(B, n_l, D)``; loads the bank rows if needed."""
        if not self.memory_bank:
            return [p[labels] for p in self.proxy_class_prompts]
        classes, rows = torch.unique(labels, sorted=True, return_inverse=True)
        slots = self.proxy_class_slot[0].shape[0]
        if len(classes) > slots:
            raise ValueError(f"batch holds {len(classes)} classes, the memory-bank slot only {slots}")
        self._slot_classes = classes.cpu()
        with torch.no_grad():
            for slot, bank in zip(self.proxy_class_slot, self._bank):
                slot.zero_()
                slot[: len(classes)] = bank[self._slot_classes].to(slot.device)
        return [slot[rows] for slot in self.proxy_class_slot]

    def proxy_observations(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Second pass with class prompts in place of the shared ones -> normalised proxy head output."""
        tokens = embed_tokens(self.backbone, images)
        tokens = run_blocks(self.backbone, tokens, self.class_layer_prompts(labels), "vptspg")
        return F.normalize(self.proxy_head(pool_tokens(self.backbone, tokens)).float(), dim=-1)

    def integrate(self, observations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes, h)``: each batch class's container value updated by its observations, renormalised."""
        classes, per_class, mask = group_by_class(observations, labels)
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
        embeddings = self.head(self.features(images))
        classes, h = self.integrate(self.proxy_observations(images, labels), labels)
        self._pending = (classes, h.detach())
        return self.criterion(embeddings, labels, proxies=self.proxies(classes, h)), {}

    def after_step(self) -> None:
        """Write the batch's integrated values into the container (detached: the next step starts there)."""
        if self._pending is not None:
            classes, h = self._pending
            self.proxy_container[classes] = h.to(self.proxy_container.dtype)
            self._pending = None

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

    # ------------------------------------------------------------------ memory bank plumbing
    def _slot_in(self, optimizer: torch.optim.Optimizer) -> bool:
        first = self.proxy_class_slot[0]
        return any(p is first for g in optimizer.param_groups for p in g["params"])

    def _row_states(self, optimizer: torch.optim.Optimizer):
        """(layer, key, optimizer state tensor) for every per-row state of the slot parameters."""
        for layer, slot in enumerate(self.proxy_class_slot):
            for key, value in optimizer.state.get(slot, {}).items():
                if torch.is_tensor(value) and value.shape == slot.shape:
                    yield layer, key, value

    def bank_load_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Before ``step()``: the batch classes' optimizer state rows into the slot's state."""
        n = len(self._slot_classes)
        with torch.no_grad():
            for layer, key, value in self._row_states(optimizer):
                bank = self._bank_state[layer].setdefault(key, torch.zeros_like(self._bank[layer]))
                value.zero_()
                value[:n] = bank[self._slot_classes].to(value.device, value.dtype)

    def bank_save(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``step()``: updated prompt rows and their optimizer state back to the CPU bank."""
        n, rows = len(self._slot_classes), self._slot_classes
        with torch.no_grad():
            for slot, bank in zip(self.proxy_class_slot, self._bank):
                bank[rows] = slot[:n].detach().to("cpu", bank.dtype)
            for layer, key, value in self._row_states(optimizer):
                bank = self._bank_state[layer].setdefault(key, torch.zeros_like(self._bank[layer]))
                bank[rows] = value[:n].to("cpu", bank.dtype)

    def resume_state(self) -> dict[str, Any]:
        if not self.memory_bank:  # on the device the optimizer's own state holds every row
            return {}
        return {"bank_state": [{k: v.clone() for k, v in layer.items()} for layer in self._bank_state]}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        if self.memory_bank and "bank_state" in state:
            self._bank_state = [dict(layer) for layer in state["bank_state"]]

    def class_prompt_values(self) -> list[torch.Tensor]:
        """Current class prompts per layer ``(C, n_l, D)``, wherever they live."""
        if self.memory_bank:
            return list(self._bank)
        return [p.detach() for p in self.proxy_class_prompts]

    def count_parameters(self) -> dict[str, int]:
        counts = super().count_parameters()
        if self.memory_bank:  # count the bank, not the slot
            delta = sum(b.numel() for b in self._bank) - sum(s.numel() for s in self.proxy_class_slot)
            counts["params/trainable"] += delta
            counts["params/total"] += delta
        return counts

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state_dict()
        if self.memory_bank:  # same keys as on-device mode, so checkpoints are interchangeable
            state = {k: v for k, v in state.items() if not k.startswith("proxy_class_slot")}
            state.update({f"proxy_class_prompts.{i}": b for i, b in enumerate(self._bank)})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.memory_bank:
            state = dict(state)
            for i, bank in enumerate(self._bank):
                if f"proxy_class_prompts.{i}" in state:
                    bank.copy_(state.pop(f"proxy_class_prompts.{i}"))
        super().load_trainable_state_dict(state)


# ---------------------------------------------------------------------------- optimizer hooks
_BANK_MODELS: "weakref.WeakSet[VPTSPGModel]" = weakref.WeakSet()
_HOOKS: list = []


def _pre_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for model in list(_BANK_MODELS):
        if model._slot_in(optimizer):
            model.bank_load_state(optimizer)


def _post_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    for model in list(_BANK_MODELS):
        if model._slot_in(optimizer):
            model.bank_save(optimizer)


def _install_optimizer_hooks() -> None:
    """Register the global step hooks once: whichever loop steps the optimizer, the bank follows."""
    if not _HOOKS:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        _HOOKS.append(register_optimizer_step_pre_hook(_pre_step))
        _HOOKS.append(register_optimizer_step_post_hook(_post_step))


# ---------------------------------------------------------------------------- builders


def _check(cfg: VPTSPGConfig, ctx: BuildContext) -> None:
    if ctx.cfg.loss.name != "proxy_anchor":
        raise UserError(f"bad value {ctx.cfg.loss.name!r} for 'loss.name': VPTSP-G trains with proxy_anchor")
    for key in ("num_prompt", "num_class_prompt"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"bad value {getattr(cfg, key)!r} for 'method_args.{key}': must be > 0")
    for key in ("prompt_block_step", "class_prompt_block_step"):
        if getattr(cfg, key) < 0:
            raise UserError(f"bad value {getattr(cfg, key)!r} for 'method_args.{key}': must be >= 0")
    if not 0.0 <= cfg.proxy_bias_ratio <= 1.0:
        raise UserError(f"bad value {cfg.proxy_bias_ratio!r} for 'method_args.proxy_bias_ratio': must be in [0, 1]")
    if not 0.0 <= cfg.rnn_dropout < 1.0:
        raise UserError(f"bad value {cfg.rnn_dropout!r} for 'method_args.rnn_dropout': must be in [0, 1)")
    if cfg.lr_proxy <= 0:
        raise UserError(f"bad value {cfg.lr_proxy!r} for 'method_args.lr_proxy': must be > 0")
    if isinstance(cfg, VPTSPEMAConfig) and not 0.0 <= cfg.ema_momentum < 1.0:
        raise UserError(f"bad value {cfg.ema_momentum!r} for 'method_args.ema_momentum': must be in [0, 1)")


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
    criterion = ProxyAnchorLoss(ctx.num_classes, dim, alpha=loss.alpha, margin=loss.margin,
                                positive_average=loss.positive_average)
    criterion.register_parameter("proxies", None)  # VPTSP-G passes its own proxies every step
    integrator = GRUIntegrator(dim, cfg.rnn_dropout) if integration == "gru" else None
    data = ctx.cfg.data
    slot_rows = data.batch_size // data.samples_per_class if data.samples_per_class else data.batch_size
    return VPTSPGModel(
        ctx.backbone, head, criterion, prompts=prompts, class_prompts=class_prompts, proxy_head=proxy_head,
        integrator=integrator, cfg=cfg, slot_rows=slot_rows,
    )


_SEARCH = {
    "optim.weight_decay": None,  # the published configs barely use it (0 to 1e-4); tune the proxies instead
    "method_args.lr_proxy": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
    "method_args.proxy_bias_ratio": {"type": "float", "low": 0.1, "high": 0.9},
}
#: shared prompts (inference path) and the proxy path (training only); biases train (BitFit)
_DECLARED = {"families": ("vit",), "prefixes": ("prompt_", "proxy_"), "training_only": ("proxy_",),
             "backbone": "biases", "search_space": _SEARCH, "defaults": {"loss.name": "proxy_anchor"}}


@register_method("vptsp_g", display="VPTSP-G", config=VPTSPGConfig, presets=vptspg_recipes.presets("vptsp_g"), **_DECLARED)
def vptsp_g(ctx: BuildContext, cfg: VPTSPGConfig) -> DMLModel:
    """VPTSP-G: shared prompts + semantic proxies from class prompts, integrated by a GRU."""
    return build_vptsp(ctx, cfg, "gru", "vptsp_g")


@register_method("vptsp_ema", display="VPTSP-G (EMA)", config=VPTSPEMAConfig, presets=vptspg_recipes.presets("vptsp_ema"), **_DECLARED)
def vptsp_ema(ctx: BuildContext, cfg: VPTSPEMAConfig) -> DMLModel:
    """VPTSP-G with the paper's EMA integration of the semantic proxies instead of the GRU."""
    return build_vptsp(ctx, cfg, "ema", "vptsp_ema")
