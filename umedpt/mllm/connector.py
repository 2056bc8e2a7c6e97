"""Connectors from resampled visual tokens to the LLM's embedding space.

:class:`ConnectorMoE` is Uni-Med's connector mixture-of-experts (CMoE); its defaults reproduce the
reference implementation: five two-layer MLP projection experts mixed per token by a soft router
that reads the token and a learnable task token. :class:`MLPConnector` is the plain two-layer MLP
baseline (LLaVA-1.5 style).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

RouterType = Literal["soft", "sparse", "hard", "constant"]
RouterInput = Literal["task_token", "token", "task"]


def two_layer_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """``Linear(in_dim, hidden) -> GELU -> Linear(hidden, out_dim)``."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ConnectorMoE(nn.Module):
    """Connector mixture-of-experts: ``y = sum_k w_k * E_k(x)`` per visual token.

    Routing weights ``w`` (one per expert and token) come from the router type:

    - ``soft`` (default): ``sigmoid(l) / sum_k sigmoid(l_k)`` of the router logits ``l`` (not a softmax);
    - ``sparse``: softmax over the ``top_k`` largest logits, the others set to ``-inf``
      (exactly ``top_k`` non-zero weights);
    - ``hard``: one-hot on expert ``tasks.index(task)``;
    - ``constant``: ``1 / num_experts`` for every expert.

    The router (soft and sparse only) is ``Linear(r, router_hidden) -> GELU -> Linear(router_hidden, N)``
    on ``r`` = the task token followed by the visual token (``task_token``, default), the visual
    token alone (``token``) or the task token alone (``task``). Task tokens are learnable
    ``(1, 1, task_token_dim)`` vectors, normal with std 0.02, one per task, used only by the router.
    Hard and constant routing have no router and no task tokens (``router`` is ``None``).

    Args:
        in_dim: channels of a (resampled) visual token.
        out_dim: width of the LLM's embeddings.
        tasks: task names (e.g. ``["vqa", "refer", "identify", "caption", "cls"]``); their order
            gives the expert of each task under hard routing.
        num_experts: number of projection experts N.
        router_type: ``"soft"``, ``"sparse"``, ``"hard"`` or ``"constant"``.
        router_input: ``"task_token"``, ``"token"`` or ``"task"``.
        task_token_dim: channels of a task token (default ``in_dim``).
        expert_hidden: hidden width of an expert (default ``out_dim``).
        router_hidden: hidden width of the router (default 4 x the router input width, as the
            reference; a smaller one saves most of the connector's parameters).
        top_k: experts kept per token by the sparse router.
        sparse_compute: run each expert only on the tokens that give it a non-zero weight
            (sparse and hard routers); same output, less compute.

    ``forward(tokens (B, L, in_dim), task) -> (out (B, L, out_dim), weights (B, L, N))``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        tasks: Sequence[str],
        num_experts: int = 5,
        router_type: RouterType = "soft",
        router_input: RouterInput = "task_token",
        task_token_dim: int | None = None,
        expert_hidden: int | None = None,
        router_hidden: int | None = None,
        top_k: int = 2,
        sparse_compute: bool = False,
    ) -> None:
        super().__init__()
        if router_type not in ("soft", "sparse", "hard", "constant"):
            raise ValueError(f"ConnectorMoE: unknown router_type {router_type!r}")
        if router_input not in ("task_token", "token", "task"):
            raise ValueError(f"ConnectorMoE: unknown router_input {router_input!r}")
        if num_experts < 1:
            raise ValueError(f"ConnectorMoE: num_experts must be >= 1, got {num_experts}")
        if len(set(tasks)) != len(tasks) or not tasks:
            raise ValueError(f"ConnectorMoE: tasks must be unique and non-empty, got {list(tasks)}")
        if router_type == "sparse" and not 1 <= top_k <= num_experts:
            raise ValueError(f"ConnectorMoE: top_k must be in [1, {num_experts}], got {top_k}")
        if router_type == "hard" and len(tasks) > num_experts:
            raise ValueError(
                f"ConnectorMoE: hard routing needs one expert per task ({len(tasks)} tasks, {num_experts} experts)"
            )
        self.in_dim, self.out_dim = in_dim, out_dim
        self.tasks = list(tasks)
        self.num_experts = num_experts
        self.router_type: RouterType = router_type
        self.router_input: RouterInput = router_input
        self.task_token_dim = task_token_dim or in_dim
        self.top_k = top_k
        self.sparse_compute = sparse_compute
        hidden = expert_hidden or out_dim
        self.experts = nn.ModuleList(two_layer_mlp(in_dim, hidden, out_dim) for _ in range(num_experts))
        self.task_tokens = nn.ParameterDict()
        self.router: nn.Sequential | None = None
        if router_type in ("soft", "sparse"):
            router_in = {
                "task_token": self.task_token_dim + in_dim,
                "token": in_dim,
                "task": self.task_token_dim,
            }[router_input]
            self.router = two_layer_mlp(router_in, router_hidden or 4 * router_in, num_experts)
            if router_input != "token":
                for task in self.tasks:
                    self.task_tokens[task] = nn.Parameter(torch.randn(1, 1, self.task_token_dim) * 0.02)

    def _task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise KeyError(f"ConnectorMoE: unknown task {task!r}; known tasks: {self.tasks}")
        return self.tasks.index(task)

    def route(self, tokens: Tensor, task: str) -> Tensor:
        """Routing weights ``(B, L, N)`` of ``tokens`` (B, L, in_dim) for ``task``."""
        index = self._task_index(task)
        b, length, _ = tokens.shape
        if self.router is None:
            if self.router_type == "hard":
                weights = tokens.new_zeros(b, length, self.num_experts)
                weights[..., index] = 1.0
                return weights
            return tokens.new_full((b, length, self.num_experts), 1.0 / self.num_experts)
        if self.router_input == "token":
            router_in = tokens
        else:
            task_token = self.task_tokens[task].expand(b, length, -1).to(tokens.dtype)
            router_in = task_token if self.router_input == "task" else torch.cat([task_token, tokens], dim=-1)
        logits = self.router(router_in)
        if self.router_type == "soft":
            gates = logits.sigmoid()
            return gates / gates.sum(dim=-1, keepdim=True)
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, top_index, top_logits)
        return F.softmax(sparse, dim=-1)

    def forward(self, tokens: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """Mix the experts' projections of ``tokens`` for ``task``; also return the weights."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(
                f"ConnectorMoE expects (B, L, {self.in_dim}) tokens, got shape {tuple(tokens.shape)}"
            )
        weights = self.route(tokens, task)
        if self.sparse_compute and self.router_type in ("sparse", "hard"):
            return self._mix_selected(tokens, weights), weights
        out = sum(
            w[..., None] * expert(tokens) for w, expert in zip(weights.unbind(-1), self.experts, strict=True)
        )
        return out, weights

    def _mix_selected(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """The same mixture, running each expert only on the tokens routed to it."""
        flat, flat_w = tokens.reshape(-1, self.in_dim), weights.reshape(-1, self.num_experts)
        out: Tensor | None = None
        for k, expert in enumerate(self.experts):
            rows = flat_w[:, k].nonzero().squeeze(1)
            if rows.numel():
                part = flat_w[rows, k, None] * expert(flat[rows])
                out = (part.new_zeros(flat.shape[0], self.out_dim) if out is None else out).index_add(
                    0, rows, part
                )
        if out is None:  # no tokens at all
            out = flat.new_zeros(flat.shape[0], self.out_dim)
        return out.reshape(*tokens.shape[:-1], self.out_dim)

    def load_balancing_loss(self, weights: Tensor) -> Tensor:
        """Switch-Transformer balance loss ``N * sum_k f_k * P_k`` of routing ``weights`` (B, L, N).

        ``P_k`` is expert ``k``'s mean weight and ``f_k`` the fraction of tokens dispatched to it
        (the non-zero weights of the sparse router, the largest weight of the soft router). It is 1
        for perfectly balanced routing and ``N`` when every token goes to one expert; 0 (no
        router to train) for hard and constant routing.
        """
        if self.router is None:
            return weights.new_zeros(())
        flat = weights.reshape(-1, self.num_experts)
        if self.router_type == "sparse":
            dispatch = (flat > 0).float() / self.top_k
        else:
            dispatch = F.one_hot(flat.argmax(dim=-1), self.num_experts).float()
        return self.num_experts * (dispatch.mean(0) * flat.mean(0)).sum()

    def extra_repr(self) -> str:
        return (
            f"tasks={self.tasks}, router_type={self.router_type!r}, router_input={self.router_input!r}, "
            f"top_k={self.top_k}"
        )


class MLPConnector(nn.Module):
    """Plain connector baseline: one two-layer MLP for every task (no routing).

    ``forward(tokens, task) -> (out, None)`` mirrors :class:`ConnectorMoE`.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = two_layer_mlp(in_dim, hidden or out_dim, out_dim)

    def forward(self, tokens: Tensor, task: str | None = None) -> tuple[Tensor, None]:
        """Project ``tokens`` (B, L, in_dim) to (B, L, out_dim); ``task`` is ignored."""
        return self.mlp(tokens), None
