"""The few-shot command line on generated data, for the tests that start it in other processes.

``python imaml_cli_worker.py train ...`` (alone, or as torchrun's script) runs
``python -m applications.imaml train ...`` with ``build_samplers`` replaced by the generated
'characters' of ``helpers.class_pool``, exactly as ``test_imaml_cli.py``'s ``FakeData`` does in
process, so a run here and one there see the same tasks and episodes.

With ``$IMAML_WORKER_DRAWS=1`` every meta-step also draws one number from the process's global
torch random stream, as rank-specific randomness (dropout, augmentation) would: the checkpoints'
random states then move with the steps, so that a resume that failed to restore them shows.

With ``$IMAML_WORKER_SIGNAL=RANK:STEP:NAME`` (e.g. ``1:2:SIGKILL``) the process of that rank sends
itself the signal right after drawing the tasks of meta-step STEP: in the middle of that step, at
the same point on every run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import class_pool  # noqa: E402

from applications.imaml import __main__ as cli  # noqa: E402
from applications.imaml.data import EpisodeSampler  # noqa: E402
from applications.imaml.train import Trainer  # noqa: E402


class SignallingSampler(EpisodeSampler):
    """Sends this process ``signal`` right after drawing its ``at``-th batch."""

    at: int | None = None
    signal: int = signal.SIGTERM
    calls = 0

    def sample(self, batch_size):
        episode = super().sample(batch_size)
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signal)
        return episode


def generated_samplers(config, data_dir, *, cache_dir, download, device, progress):
    """``build_samplers`` on generated data: the config's episode shape, 8 training and 4 test classes."""
    pool = class_pool()
    shape = dict(n_way=config.n_way, k_shot=config.k_shot, k_query=config.k_query, device=device)
    train = SignallingSampler(pool[:8], rotations=True, seed=config.seed, **shape)
    plan = os.environ.get("IMAML_WORKER_SIGNAL")
    if plan:
        rank, step, name = plan.split(":")
        if rank == os.environ.get("RANK", "0"):
            train.at, train.signal = int(step), getattr(signal, name)
    test = EpisodeSampler(pool[8:], seed=config.seed + 10_000, **shape)
    return train, test, 1, 28


def draw_each_step() -> None:
    """Make every meta-step draw from the global torch random stream (and log what it drew)."""
    import torch

    step = Trainer.meta_step

    def meta_step(self):
        record = step(self)
        record["global_draw"] = float(torch.rand(()))
        return record

    Trainer.meta_step = meta_step


if __name__ == "__main__":
    cli.build_samplers = generated_samplers
    if os.environ.get("IMAML_WORKER_DRAWS") == "1":
        draw_each_step()
    cli.main_and_exit(sys.argv[1:])
