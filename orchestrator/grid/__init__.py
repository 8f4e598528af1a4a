"""Grids: a grid file's schema and validation (:mod:`.config`, no Ray), the Tune trial driver
(:mod:`.trial`), the console and MLflow callbacks (:mod:`.progress`) and the tuner
(:mod:`.tuner`). Importing this package imports no Ray."""
