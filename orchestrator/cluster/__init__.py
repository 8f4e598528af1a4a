"""What every topology and grid shares about a cluster: reaching Ray (:mod:`.connect`), local and
bucket folders (:mod:`.storage`), Ray Jobs (:mod:`.submit`), tokens and probes (:mod:`.secrets`).
A topology's own Ray parts live with it (``orchestrator/topology/split/``)."""
