"""The Ray side of one pair: reaching Ray (:mod:`.connect`), the adapter actor and its proxy
(:mod:`.actor`), the Ray Train worker (:mod:`.worker`). The driver that starts them is
:func:`orchestrator.pair.run_pair_on_ray`."""
