"""On several processes ``compiled.optimizer`` is the optimizer the engine steps (issue 16, item 1:
an LR set on it used to be ignored): setting its learning rate and LR schedulers take effect."""

from autopar.runtime import spawn
from tests.helpers.distributed import optimizer_workers


def test_learning_rate_changes_reach_the_engine():
    spawn(optimizer_workers.lr_reaches_the_engine, 2, timeout_s=90)
