"""Training: a role (one model on its task), the pair state and the one training loop
(:mod:`.loop`), one optimisation step (:mod:`.step`), the optimiser machinery (:mod:`.optim`) and
the single-process host (:mod:`.engine`)."""
