"""The actors of asynchronous online DPO, handed to align_rl as one factory object
(:class:`StreamActors`, :attr:`align_rl.remote.Workers.stream`): the weight store, the pair buffer
and the validator. The samplers and rewarders are the candidate pool's (:mod:`actors.pool`)."""

from __future__ import annotations

from .buffer import make_buffer
from .validator import make_validator
from .weights import make_weight_store


class StreamActors:
    """``weight_store(keep)``, ``buffer(*PairBuffer args)``, ``validator(validation, cfg,
    reference_ckpt, out_dir, num_cpus)``."""

    weight_store = staticmethod(make_weight_store)
    buffer = staticmethod(make_buffer)
    validator = staticmethod(make_validator)
