"""Meta-training and evaluation loops: progress bar, logs, plots, atomic checkpoints, exact resume."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .algorithms import AlgorithmConfig, MetaLearner, TaskBatch
from .configs import PAPER_TABLE2, ExperimentConfig
from .io import atomic_save, atomic_write_text
from .model import ConvNet, init_params

__all__ = ["Trainer", "evaluate", "confidence_interval", "atomic_save", "EvalResult"]

logger = logging.getLogger(__name__)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% normal confidence interval, in percent."""
    acc = accuracies.double() * 100.0
    n = acc.numel()
    if n < 2:
        return float(acc.mean()), float("nan")
    return float(acc.mean()), float(1.96 * acc.std(unbiased=True) / math.sqrt(n))


@dataclass
class EvalResult:
    """Meta-test accuracy over ``episodes`` episodes: mean and 95% interval half-width (percent)."""

    accuracy: float
    ci95: float
    episodes: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.accuracy:.2f} +- {self.ci95:.2f}% over {self.episodes} episodes"


def evaluate(learner: MetaLearner, theta: dict[str, torch.Tensor], sampler, episodes: int, *,
             log_lam: dict[str, torch.Tensor] | None = None, batch_size: int = 20,
             progress: bool = True) -> EvalResult:
    """Adapt to ``episodes`` meta-test episodes and measure query accuracy (no meta-gradients)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    accs = []
    bar = tqdm(total=episodes, desc="evaluate", unit="ep", disable=not progress, leave=False)
    remaining = episodes
    while remaining > 0:
        ep = sampler.sample(min(batch_size, remaining))
        for i in range(ep.support_x.shape[0]):
            phi = learner.adapt(theta, ep.support_x[i], ep.support_y[i], log_lam)
            with torch.no_grad():
                pred = learner.logits(phi, ep.query_x[i]).argmax(-1)
            accs.append((pred == ep.query_y[i]).float().mean())
            bar.update(1)
        remaining -= ep.support_x.shape[0]
    bar.close()
    mean, ci = confidence_interval(torch.stack(accs))
    return EvalResult(mean, ci, len(accs), time.perf_counter() - start)


class Trainer:
    """Meta-trains one configuration, with checkpoints every ``checkpoint_every`` steps and on Ctrl-C.

    Parameters
    ----------
    config:
        The experiment.
    out_dir:
        Where ``checkpoint.pt``, ``metrics.jsonl``, ``learning_curve.png`` and ``summary.json`` go.
    train_sampler, test_sampler:
        Episode samplers (``sample(batch) -> episode``, ``state_dict()``, ``load_state_dict()``).
    device:
        Where the network runs.
    in_channels, image_size:
        Input shape of the network.
    """

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, train_sampler, test_sampler, *,
                 device: str | torch.device = "cpu", in_channels: int = 1, image_size: int = 28,
                 progress: bool = True):
        self.config = config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.train_sampler = train_sampler
        self.test_sampler = test_sampler
        self.device = torch.device(device)
        self.progress = progress
        self.model = ConvNet(config.n_way, in_channels=in_channels, image_size=image_size).to(self.device)
        self.learner = MetaLearner(self.model, AlgorithmConfig(**config.algorithm))
        self.theta = init_params(self.model, seed=config.seed, device=self.device)
        self.log_lam = None
        if self.learner.config.learn_lam:
            lam = float(self.learner.config.lam)
            self.log_lam = {k: torch.full_like(v, math.log(lam)).detach().requires_grad_(True)
                            for k, v in self.theta.items()}
        params = list(self.theta.values()) + (list(self.log_lam.values()) if self.log_lam else [])
        self.optimizer = torch.optim.Adam(params, lr=config.outer_lr)
        self.step = 0
        self.history: list[dict[str, Any]] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": self.config.to_dict(),
            "step": self.step,
            "theta": {k: v.detach().cpu() for k, v in self.theta.items()},
            "log_lam": None if self.log_lam is None else {k: v.detach().cpu() for k, v in self.log_lam.items()},
            "optimizer": self.optimizer.state_dict(),
            "train_sampler": self.train_sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }

    def save(self) -> None:
        """Write the checkpoint atomically."""
        atomic_save(self.state_dict(), self.checkpoint_path)

    def resume(self) -> None:
        """Continue exactly where the checkpoint in ``out_dir`` stopped (same RNG streams)."""
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}; start without --resume.")
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise RuntimeError(f"the checkpoint {self.checkpoint_path} is unreadable ({e}); delete it to restart.") from e
        if state.get("config") != self.config.to_dict():
            raise ValueError(f"the checkpoint in {self.out_dir} was written by a different configuration; use "
                             f"another --out folder or the same config.")
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(state["theta"][k].to(self.device))
            if self.log_lam is not None:
                for k, v in self.log_lam.items():
                    v.copy_(state["log_lam"][k].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_sampler.load_state_dict(state["train_sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.history = state["history"]
        logger.info("resumed from %s at step %d", self.checkpoint_path, self.step)

    # -- training ----------------------------------------------------------------------------------
    def meta_step(self) -> dict[str, float]:
        """One outer step: sample a meta-batch, accumulate its meta-gradient, update with Adam."""
        ep = self.train_sampler.sample(self.config.meta_batch)
        batch = TaskBatch(ep.support_x, ep.support_y, ep.query_x, ep.query_y)
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.learner.meta_gradient(self.theta, batch, self.log_lam)
        grad_norm = math.sqrt(sum(float(v.grad.pow(2).sum()) for v in self.theta.values() if v.grad is not None))
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, **stats, "meta_grad_norm": grad_norm}

    def train(self, steps: int | None = None, *, on_step: Callable[[dict], None] | None = None) -> None:
        """Run until ``steps`` (default: the config's ``meta_steps``), checkpointing; Ctrl-C saves and re-raises."""
        from tqdm.auto import tqdm

        total = self.config.meta_steps if steps is None else steps
        metrics = (self.out_dir / "metrics.jsonl").open("a")
        bar = tqdm(total=total, initial=self.step, desc=self.config.algorithm["name"], unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's kill saves a checkpoint like Ctrl-C
        try:
            start = time.perf_counter()
            while self.step < total:
                record = self.meta_step()
                record["seconds"] = time.perf_counter() - start
                if self.config.eval_every and self.step % self.config.eval_every == 0:
                    res = evaluate(self.learner, self.theta, self.test_sampler, min(100, self.config.eval_episodes),
                                   log_lam=self.log_lam, progress=False)
                    record["val_accuracy"] = res.accuracy
                self.history.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{record['query_loss']:.3f}", acc=f"{100 * record['query_accuracy']:.1f}%")
                bar.update(1)
                if on_step is not None:
                    on_step(record)
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            self.save()
            logger.warning("interrupted at step %d; checkpoint written to %s (continue with --resume)", self.step,
                           self.checkpoint_path)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            metrics.close()
        bar.close()
        self.save()
        self.plot()

    def plot(self) -> Path | None:
        """Save ``learning_curve.png`` (query loss and accuracy against meta-steps, smoothed)."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        window = max(1, len(steps) // 50)

        def smooth(values):
            t = torch.tensor(values, dtype=torch.float64)
            kernel = torch.ones(window, dtype=torch.float64) / window
            return torch.nn.functional.conv1d(t.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1).tolist()

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, key, label in ((axes[0], "query_loss", "query loss"), (axes[1], "query_accuracy", "query accuracy")):
            values = [r[key] * (100 if key == "query_accuracy" else 1) for r in self.history]
            ax.plot(steps, values, color="0.8", lw=0.8, label="per step")
            ax.plot(steps[window - 1:], smooth(values), lw=1.8, label=f"mean of {window}")
            ax.set_xlabel("meta-step")
            ax.set_ylabel(label + (" (%)" if key == "query_accuracy" else ""))
            ax.grid(alpha=0.3)
        val = [(r["step"], r["val_accuracy"]) for r in self.history if "val_accuracy" in r]
        if val:
            axes[1].plot(*zip(*val), "o-", label="meta-test (100 episodes)")
        axes[1].legend(loc="lower right")
        c = self.config
        fig.suptitle(f"{c.algorithm['name']} on {c.dataset}, {c.n_way}-way {c.k_shot}-shot")
        fig.tight_layout()
        path = self.out_dir / "learning_curve.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def final_evaluation(self, episodes: int | None = None) -> EvalResult:
        """Evaluate on meta-test episodes, write ``summary.json`` and return the result."""
        res = evaluate(self.learner, self.theta, self.test_sampler, episodes or self.config.eval_episodes,
                       log_lam=self.log_lam, progress=self.progress)
        c = self.config
        paper = PAPER_TABLE2.get((c.algorithm["name"], c.n_way, c.k_shot)) if c.dataset == "omniglot" else None
        summary = {"config": c.to_dict(), "steps": self.step, "accuracy": res.accuracy, "ci95": res.ci95,
                   "episodes": res.episodes, "paper": paper}
        atomic_write_text(json.dumps(summary, indent=2), self.out_dir / "summary.json")
        return res


def results_table(rows: list[tuple[str, ExperimentConfig, EvalResult]]) -> str:
    """A plain-text table of measured accuracies beside the paper's Table 2."""
    lines = [f"{'run':<28} {'setting':<16} {'measured':>18} {'paper (Table 2)':>18}"]
    for name, c, res in rows:
        paper = PAPER_TABLE2.get((c.algorithm["name"], c.n_way, c.k_shot)) if c.dataset == "omniglot" else None
        paper_s = f"{paper[0]:.2f} +- {paper[1]:.2f}%" if paper else "-"
        lines.append(f"{name:<28} {f'{c.n_way}-way {c.k_shot}-shot':<16} "
                     f"{f'{res.accuracy:.2f} +- {res.ci95:.2f}%':>18} {paper_s:>18}")
    return "\n".join(lines)
