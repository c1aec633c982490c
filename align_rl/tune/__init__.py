"""Ray Tune sweeps over β, learning rate, reward weights and the offline/online switch."""
