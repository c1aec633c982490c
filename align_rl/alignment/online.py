"""Online Diffusion-DPO (docs/method.md §9): alternate learner rounds and pair refreshes by the policy.

Round ``r`` (``r = 0, 1, …``) trains ``cfg.dpo.sync_every`` learner steps (:func:`run_dpo`, resuming
in ``out_dir``) on the buffer of pairs. Before round ``r``:

1. the sampler actors receive the current policy weights, version ``r`` (put in the object store
   once; version 0 is the reference);
2. they draw candidates for new backgrounds (round 0: ``pairs.backgrounds`` of them; later rounds:
   the next ``dpo.online_backgrounds`` of the seeded background order), which are scored, paired
   and committed to the store tagged with version ``r``;
3. pairs of versions below ``r − dpo.staleness`` leave the buffer (``PairStore.drop_stale``).

So the policy trained in round ``r`` becomes version ``r + 1``. Killing the driver and rerunning
resumes: finished rounds are read from ``out_dir`` (the learner's state) and committed pairs from
the store.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from align_rl.alignment.learner import DPOResult, POLICY_FILE, read_state, run_dpo
from align_rl.training.resources import check_online


def round_backgrounds(r: int, order: Sequence[int], first: int, per_round: int) -> list[int]:
    """Background ids of round ``r``: the first ``first`` of ``order`` for round 0, then
    ``per_round`` more per round (wrapping around the order when it is used up)."""
    order = list(order)
    if r == 0:
        return order[:first]
    start = first + (r - 1) * per_round
    return [order[(start + i) % len(order)] for i in range(per_round)]


def run_online(cfg: Any, ws: Any, pool: Any, store: Any, tasks_for: Callable[[list[int]], list],
               order: Sequence[int], reference_ckpt: Path, mode: str, out_dir: Path,
               progress: bool = True, log: Callable[[str], None] = print,
               release_pool: bool = True, validation: dict | None = None) -> DPOResult:
    """Online alignment of one pair ``mode`` (see the module docstring). ``pool``: a
    :class:`actors.pool.CandidatePool`; ``tasks_for(ids)`` builds the :class:`BackgroundTask`
    of background ids; ``order``: the seeded background order. Returns the last round's result
    (with ``history`` of every step) and records sync times in ``out_dir/online.json``.
    ``release_pool``: stop the actors while the learner trains (they restart for the next
    refresh with the current weights), so both fit on a small machine."""
    import json

    check_online(cfg, release_pool)  # a learner or pool larger than the cluster: refused now
    k, total = int(cfg.dpo.sync_every), int(cfg.dpo.steps)
    rounds = math.ceil(total / k)
    state = read_state(out_dir)
    done_steps = int(state["step"]) if state else 0
    res: DPOResult | None = None
    log_path = Path(out_dir) / "online.json"
    records = json.loads(log_path.read_text()) if log_path.exists() else []
    for r in range(done_steps // k, rounds):
        version = r  # the policy that draws this round's candidates
        sync_s = 0.0
        if version > 0 or pool.version != 0:
            pool.ensure()
        if version > 0:
            from align_rl.io.checkpoints import read_checkpoint

            ck = read_checkpoint(Path(out_dir) / POLICY_FILE)
            sync_s = pool.set_weights(ck["state_dict"], version)
        elif pool.version != 0:
            sync_s = pool.set_weights(torch.load(reference_ckpt, map_location="cpu",
                                                 weights_only=True)["state_dict"], 0)
        ids = round_backgrounds(r, order, int(cfg.pairs.backgrounds), int(cfg.dpo.online_backgrounds))
        t0 = time.perf_counter()
        added = pool.build(tasks_for(ids), store, [mode], progress=progress)
        if release_pool:
            pool.release()  # the learner runs next: free the actors' CPUs / GPUs
        active = store.drop_stale(version - int(cfg.dpo.staleness))
        steps = min(total, (r + 1) * k)
        log(f"online round {r}: policy v{version}, {added['pairs']} new pairs "
            f"({time.perf_counter() - t0:.1f} s), {active} active, training to step {steps}")
        res = run_dpo(cfg, ws, (store, store.pair_set(mode)), reference_ckpt, steps=steps,
                      out_dir=out_dir, mode=mode, progress=progress, validation=validation)
        records.append({"round": r, "version": version, "sync_s": sync_s, "new_pairs": added["pairs"],
                        "active_pairs": active, "steps": steps, "result_version": res.version})
        log_path.write_text(json.dumps(records, indent=1))
    if res is None:  # every round was done before: the stored result
        res = run_dpo(cfg, ws, (store, store.pair_set(mode, min_version=0)), reference_ckpt,
                      steps=total, out_dir=out_dir, mode=mode, progress=progress,
                      validation=validation)
    return res
