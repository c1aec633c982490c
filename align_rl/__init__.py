"""align_rl: align a score-based latent data-assimilation model with several preferences.

The science (schedule, guidance, rewards, metrics, DPO) lives in this package and is testable
without Ray; Ray actors in the sibling package ``actors`` only hold models and call it.
"""

__version__ = "0.1.0"
