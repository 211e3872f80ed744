"""The paper's appendix F.1 meta-gradient accuracy study (Figure 2a): ``python -m applications.synthetic``.

See :mod:`applications.synthetic.study` for the set-up, the two regimes and the methods.
"""

from .study import METHODS, REGIMES, Task, k_grid, make_task, plot_study, run_regime, run_study, save_study

__all__ = ["METHODS", "REGIMES", "Task", "k_grid", "make_task", "plot_study", "run_regime", "run_study", "save_study"]
