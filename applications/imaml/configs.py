"""Named experiment configurations: every row of the paper's Table 2, the baselines, and a small CPU run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["ExperimentConfig", "CONFIGS", "PAPER_TABLE2", "DEFAULT_NETWORK", "PEER_NETWORK", "get_config"]

#: Schedules of the outer learning rate (:attr:`ExperimentConfig.lr_schedule`).
LR_SCHEDULES = ("constant", "cosine")
#: The paper's network: four conv blocks with padding, with PyTorch's initialisation (the study in
#: applications/imaml/README.md: He's initialisation, sqrt(6) times larger, learned markedly slower on it).
DEFAULT_NETWORK: dict[str, Any] = {"blocks": 4, "padding": 1, "hidden": 64, "init": "torch"}
#: The network of higher's and TorchOpt's Omniglot examples: three blocks without padding, PyTorch's init.
PEER_NETWORK: dict[str, Any] = {"blocks": 3, "padding": 0, "hidden": 64, "init": "torch"}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run needs besides paths and device.

    Attributes
    ----------
    dataset:
        ``"omniglot"`` or ``"mini_imagenet"``.
    n_way, k_shot, k_query:
        Episode shape: classes, support images per class, query images per class.
    algorithm:
        Keyword arguments of :class:`applications.imaml.algorithms.AlgorithmConfig`.
    meta_batch:
        Tasks per meta-step.
    meta_steps:
        Outer (Adam) steps.
    outer_lr:
        Adam's learning rate (the paper: Adam's defaults).
    lr_schedule:
        ``"constant"`` (default) or ``"cosine"``: the learning rate of step ``t`` is
        ``outer_lr (1 + cos(pi t / meta_steps)) / 2``, falling to 0 at the last step (a function of
        the step alone, so a resumed run keeps it exactly).
    eval_episodes:
        Meta-test episodes for the final evaluation (>= 600 for a 95% interval of a few tenths of a percent).
    eval_every:
        Steps between quick validation evaluations during training (0: none).
    checkpoint_every:
        Steps between checkpoints.
    seed:
        Seeds the initialisation, the class split and the episode stream.
    network:
        Keyword arguments of :class:`applications.imaml.model.ConvNet` (``blocks``, ``padding``,
        ``hidden``) and ``init``, the scheme of :func:`applications.imaml.model.init_params`.
        Default: the paper's 4-block net with padding, with PyTorch's initialisation.
    """

    dataset: str = "omniglot"
    n_way: int = 5
    k_shot: int = 1
    k_query: int = 5
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "imaml_gd"})
    meta_batch: int = 32
    meta_steps: int = 30000
    outer_lr: float = 1e-3
    lr_schedule: str = "constant"
    eval_episodes: int = 600
    eval_every: int = 1000
    checkpoint_every: int = 500
    seed: int = 0
    network: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NETWORK))

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, "
                             f"got {self.lr_schedule!r}.")

    def learning_rate(self, step: int) -> float:
        """The outer learning rate of meta-step ``step`` (0-based) under :attr:`lr_schedule`."""
        if self.lr_schedule == "cosine":
            return self.outer_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, self.meta_steps) / self.meta_steps))
        return self.outer_lr

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    def replace(self, **changes: Any) -> "ExperimentConfig":
        """A copy with some fields changed (``algorithm`` entries are merged, not replaced)."""
        if "algorithm" in changes:
            changes["algorithm"] = {**self.algorithm, **changes["algorithm"]}
        if "network" in changes:
            changes["network"] = {**self.network, **changes["network"]}
        return replace(self, **changes)


#: Test accuracy (%) and its 95% interval reported in the paper's Table 2 (Omniglot).
PAPER_TABLE2: dict[tuple[str, int, int], tuple[float, float]] = {
    ("maml", 5, 1): (98.7, 0.4), ("maml", 5, 5): (99.9, 0.1), ("maml", 20, 1): (95.8, 0.3), ("maml", 20, 5): (98.9, 0.2),
    ("fomaml", 5, 1): (98.3, 0.5), ("fomaml", 5, 5): (99.2, 0.2), ("fomaml", 20, 1): (89.4, 0.5),
    ("fomaml", 20, 5): (97.9, 0.1),
    ("reptile", 5, 1): (97.68, 0.04), ("reptile", 5, 5): (99.48, 0.06), ("reptile", 20, 1): (89.43, 0.14),
    ("reptile", 20, 5): (97.12, 0.32),
    ("imaml_gd", 5, 1): (99.16, 0.35), ("imaml_gd", 5, 5): (99.67, 0.12), ("imaml_gd", 20, 1): (94.46, 0.42),
    ("imaml_gd", 20, 5): (98.69, 0.1),
    ("imaml_hf", 5, 1): (99.50, 0.26), ("imaml_hf", 5, 5): (99.74, 0.11), ("imaml_hf", 20, 1): (96.18, 0.36),
    ("imaml_hf", 20, 5): (99.14, 0.1),
}


def _table2() -> dict[str, ExperimentConfig]:
    out = {}
    for n_way in (5, 20):
        for k_shot in (1, 5):
            base = ExperimentConfig(n_way=n_way, k_shot=k_shot, k_query=5 if n_way == 5 else 5)
            steps = 16 if n_way == 5 else 25  # the paper's appendix F.2
            tag = f"omniglot-{n_way}w{k_shot}s"
            out[f"{tag}-gd"] = base.replace(algorithm={"name": "imaml_gd", "inner_steps": steps, "lam": 2.0,
                                                       "cg_steps": 5, "inner_lr": 0.1})
            out[f"{tag}-hf"] = base.replace(algorithm={"name": "imaml_hf", "lam": 2.0, "cg_steps": 5,
                                                       "hf_iterations": 3, "hf_cg_steps": 5})
            # baselines with the schedules of their papers (MAML: Finn et al. 2017; Reptile: Nichol et al. 2018)
            maml_steps, maml_lr = (1, 0.4) if n_way == 5 else (5, 0.1)
            out[f"{tag}-maml"] = base.replace(algorithm={"name": "maml", "inner_steps": maml_steps,
                                                         "inner_lr": maml_lr})
            out[f"{tag}-fomaml"] = base.replace(algorithm={"name": "fomaml", "inner_steps": maml_steps,
                                                           "inner_lr": maml_lr})
            out[f"{tag}-reptile"] = base.replace(algorithm={"name": "reptile", "inner_steps": 10, "inner_lr": 0.1},
                                                 outer_lr=1e-3)
    # the study's base (applications/imaml/README.md), the default before the study: the peers' 3-block network
    # with PyTorch's initialisation, Gauss-Newton curvature with the support logits' Jacobian built once per
    # task (no negative curvature, near-free CG steps), 10 inner steps, lam = 0.5 and a cosine-decayed Adam of
    # 3e-3 over 800 steps of 4 tasks (the tuning runs of the side-by-side: at 1200 tasks, 3e-3 beat 1e-3 and
    # 5e-3, and 4 tasks per step beat 8).
    out["omniglot-5w1s-3block-cpu"] = out["omniglot-5w1s-gd"].replace(
        meta_batch=4, meta_steps=800, outer_lr=3e-3, eval_episodes=600, eval_every=0, checkpoint_every=100,
        lr_schedule="cosine", network=dict(PEER_NETWORK),
        algorithm={"inner_steps": 10, "lam": 0.5, "curvature": "gauss_newton_jacobian",
                   "vmap": False})  # on a CPU the loop over tasks is faster than vmap
    # the small CPU configuration behind README's main command: under 8 minutes on two cores, training and the
    # 600-episode evaluation together. The study's base with the one change that the study found worth most:
    # the paper's 4-block padded network with PyTorch's initialisation (+5.9 points at 600 tasks); it costs
    # about 1.6 times as much per task, so 500 steps of 4 tasks fit the 8 minutes.
    out["omniglot-5w1s-gd-cpu"] = out["omniglot-5w1s-3block-cpu"].replace(
        meta_steps=500, network=dict(DEFAULT_NETWORK))
    # the same with matrix-free Gauss-Newton products (the same meta-gradient, products through the network)
    out["omniglot-5w1s-gn-cpu"] = out["omniglot-5w1s-gd-cpu"].replace(algorithm={"curvature": "gauss_newton"})
    # the same with exact Hessian products (negative curvature: first-order fallback per task)
    out["omniglot-5w1s-exact-cpu"] = out["omniglot-5w1s-gd-cpu"].replace(algorithm={"curvature": "exact"})
    # the configuration README's main command had before the study: the paper's 4-block net with He's
    # initialisation, exact curvature
    out["omniglot-5w1s-paper-cpu"] = out["omniglot-5w1s-gd"].replace(
        meta_batch=8, meta_steps=150, eval_episodes=600, eval_every=0, checkpoint_every=50,
        algorithm={"inner_steps": 8, "vmap": False}, network={"init": "he"})
    return out


CONFIGS: dict[str, ExperimentConfig] = _table2()


def get_config(name: str) -> ExperimentConfig:
    """The configuration called ``name`` (see :data:`CONFIGS`); unknown names list the available ones."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; available: {', '.join(sorted(CONFIGS))}.")
    return CONFIGS[name]
