"""Tools on top of the app: the launcher behind ``make run``, the experiment harness, the
in-process driver for tests and benchmarks, and the LBI-FL agent's training."""
