"""Ray Tune sweeps over β, learning rate, reward weights and the offline/online switch.

:mod:`~align_rl.tune.spec` the typed sweep file, :mod:`~align_rl.tune.trial` one trial,
:mod:`~align_rl.tune.inputs` the shared inputs, :mod:`~align_rl.tune.run` Ray Tune (and the
trials' resource check), :mod:`~align_rl.tune.results` the tables, the report and the best config,
:mod:`~align_rl.tune.pareto` the Pareto front and its pictures (``python -m align_rl.sweep`` documents the file format).
"""
