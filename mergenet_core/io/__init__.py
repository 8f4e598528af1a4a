"""What a run writes to disk: the names of a run folder's files (here, so that every module may
name them without importing a writer) and their one writer, :class:`.outputs.RunOutputs`."""
CONFIG = "config.json"
METRICS = "metrics.jsonl"
FINAL = "final.json"
PLACEMENT = "placement.json"
BUNDLES = "bundles.json"
PAIR_BUNDLE = "pair.pt"  # a split pair's bundle inside each Ray Train checkpoint
CURVE = "learning_curve.png"  # drawn by the orchestrator's tracking (matplotlib), not the core
#: what a trial keeps of its pair's outputs (``trials/<id>/pair``)
PAIR_OUTPUTS = (CONFIG, FINAL, METRICS, PLACEMENT, CURVE, BUNDLES)
