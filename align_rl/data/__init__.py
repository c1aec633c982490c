"""``python -m align_rl.data {simulate,spinup,stats,independence}``: the embedded world's command.

The world itself (the Held–Suarez simulation, observations, backgrounds, splits) lives in
:mod:`align_rl.world`; this package only holds the command (``__main__``).
"""
