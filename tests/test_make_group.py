"""make_group ranks the composite with the run's rewards.normalize (docs/method.md §8)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from align_rl.alignment.candidates import BackgroundTask, Drawn, make_group


def test_make_group_passes_the_normalisation_on():
    # two components on very different scales; the winner depends on the normalisation:
    #   none:   a + b = [300, 1, 102, 210]           -> winner 0, loser 1
    #   zscore: z(a) = [-0.82, -0.57, -0.32, 1.70], z(b) = [1.34, -1.34, -0.45, 0.45]
    #           sum   = [0.52, -1.91, -0.77, 2.15]    -> winner 3, loser 1
    #   rank:   r(a) = [-1, -1/3, 1/3, 1], r(b) = [1, -1, -1/3, 1/3]
    #           sum   = [0, -4/3, 0, 4/3]             -> winner 3, loser 1
    scores = {"assim": np.array([0.0, 1.0, 2.0, 10.0]), "phys": np.array([300.0, 0.0, 100.0, 200.0])}
    task = BackgroundTask(7, 0, np.zeros((69, 2, 2), np.float32), np.zeros((69, 2, 2), np.float32))
    drawn = Drawn(7, 0, np.zeros((1, 1, 1), np.float32), np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1),
                  np.zeros((4, 69, 2, 2), np.float32))
    pcfg = SimpleNamespace(pairs_per_background=1, top_k_phys=1, decile=0.25)
    w = {"assim": 1.0, "phys": 1.0}

    def pair(normalize):
        g = make_group(task, drawn, scores, "repaint", ["M"], pcfg, w, 0, normalize)
        return g.pairs["M"].tolist()

    assert pair("none") == [[0, 1]]
    assert pair("zscore") == [[3, 1]]
    assert pair("rank") == [[3, 1]]
