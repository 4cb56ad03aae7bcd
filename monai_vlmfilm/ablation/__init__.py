"""The FiLM ablation: train and evaluate off / on / shuffle / oracle over seeds (and folds), then report.

Command: ``python -m monai_vlmfilm.ablation --datalist F --out DIR --modes off,on,shuffle,oracle --seeds 0,1,2``
(see :mod:`monai_vlmfilm.ablation.cli`).
"""

from .stats import analyse, bootstrap_ci, difficulty_terciles, paired_difference, t_interval, verdicts

__all__ = ["analyse", "bootstrap_ci", "difficulty_terciles", "paired_difference", "t_interval", "verdicts"]
