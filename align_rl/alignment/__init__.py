"""Diffusion-DPO alignment: rewards, candidates, preference pairs, the DPO loss, the learner, online refreshes and validation."""
