"""Ray Tune sweeps over β, learning rate, reward weights and the offline/online switch.

:mod:`~align_rl.tune.spec` the typed sweep file, :mod:`~align_rl.tune.trial` one trial,
:mod:`~align_rl.tune.inputs` the shared inputs, :mod:`~align_rl.tune.run` Ray Tune,
:mod:`~align_rl.tune.results` the tables and the best config (``python -m align_rl.sweep``
documents the file format).
"""
