"""The method contract, checked for every registered method from one table (PEFT-style
table-driven tests): a method gets these checks by being registered and having a row in
:data:`CASES`.

* determinism: the same seed gives the same metrics; another seed does not;
* resume equivalence: 2 epochs straight == 1 epoch + resume + 1 (and resuming a finished run
  changes nothing);
* state round trip: a pair rebuilt from a ``state_dict`` continues exactly like the original;
* roles: one consistent declaration; where roles may run apart, hosting each role on its own
  takes the same steps as hosting the pair;
* sync Ray equals the engine for every method whose roles may run apart (Ray Train role
  workers, and an adapter actor when the method has an exchange);
* recorded numbers: every step of every :data:`GOLDEN_CASES` run equals
  tests/golden/step_metrics.json (written by tests/make_golden.py before the step refactor of
  issue 21), so a change in RNG draw order or forward/backward order shows.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import helpers
from helpers import (assert_same_metrics, mergenet_options, numeric_items, read_metrics,
                     step_metrics, tiny_pair)
from mergenet_core.config.checks import method_options, method_roles, parse_config
from mergenet_core.training.engine import Engine
from mergenet_core.training.loop import PairState
from mergenet_core.methods import METHODS
from mergenet_core.training.step import take_step


#: one tiny pair per registered method (2 epochs; eval_every 2 where the method supports it,
#: so un-evaluated epochs' train statistics must survive a resume too)
CASES: dict[str, dict] = {
    "alone": tiny_pair("alone", source_model=None, recipe={"epochs": 2}),
    "mergenet": tiny_pair("mergenet", mergenet_options(), recipe={"epochs": 3, "eval_every": 2}),
    "kd": tiny_pair("kd", source_model="resnet18", recipe={"epochs": 2}),
    "dml": tiny_pair("dml", recipe={"epochs": 2}),
    "param_share": tiny_pair("param_share", {"layer_pairs": [{"source": "classifier.weight",
                                                              "target": "classifier.weight"}], "t_cycle": 2},
                             recipe={"epochs": 2}),
    "transplant": tiny_pair("transplant", {"layers": "all"}, source_model="cnn", recipe={"epochs": 2}),
}

METHOD_NAMES = METHODS.names()

#: the recorded runs: every CASES row, the steps test_engine.py's one-epoch runs take
#: (kd-frozen-teacher, mergenet-exact-both) and more MergeNet paths (a frozen source, the delta
#: rule with non-transfer steps, a self-transfer)
GOLDEN_CASES: dict[str, dict] = {
    **CASES,
    "kd-frozen-teacher": tiny_pair("kd", {"train_source": False}, source_model="resnet18"),
    "mergenet-exact-both": tiny_pair("mergenet", mergenet_options(source="fc.weight", update_rule="exact",
                                                                  direction="both"), source_model="resnet18"),
    "mergenet-source-frozen": tiny_pair("mergenet", mergenet_options(freeze_source=True), recipe={"epochs": 2}),
    "mergenet-delta-t2": tiny_pair("mergenet", mergenet_options(update_rule="delta", t_cycle=2),
                                   recipe={"epochs": 2}),
    "mergenet-self-transfer": tiny_pair("mergenet", mergenet_options(source="hidden.weight", self_transfer=True),
                                        source_model=None, recipe={"epochs": 2}),
}
GOLDEN = Path(__file__).parent / "golden" / "step_metrics.json"


def run(data: dict, out, **kw) -> dict:
    return Engine(parse_config(data), out, progress=False).run(**kw)


def test_every_registered_method_has_a_contract_case():
    assert set(CASES) == set(METHOD_NAMES), "add a CASES row for every registered method"


def test_contract_is_small():
    """``Method``'s public members (and ``__init__``): 26 before issue 21, 19 now (``check_shapes``
    went: fast validation runs ``setup``/``ready`` on weightless models)."""
    from mergenet_core.methods.base import Method

    members = {n for n in vars(Method) if not n.startswith("_")} | {"__init__"}
    assert len(members) <= 19, sorted(members)


def test_registry_reads_options_from_the_class():
    for name in METHOD_NAMES:
        entry = METHODS.get(name)
        assert entry.options is entry.fn.Options, name


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_roles_are_one_consistent_declaration(case):
    """``roles(options)``: trained and untrained roles (and the shared batch's owner) are needed
    ones, all within the answer for any options (``roles()``); the pair builds them and marks
    the trained ones trainable."""
    cfg = parse_config(GOLDEN_CASES[case])
    cls = METHODS.get(cfg.method.name).fn
    r, wide = cls.roles(method_options(cfg)), cls.roles()
    assert set(r.trained) <= set(r.needed) and set(r.untrained) <= set(r.needed)
    for f in ("needed", "trained", "untrained"):
        assert set(getattr(r, f)) <= set(getattr(wide, f)), f
    assert wide.apart or not r.apart
    assert r.shared_batch is None or (r.shared_batch in r.needed and not r.apart)
    pair = PairState.build(cfg)
    assert tuple(pair.roles) == r.needed
    assert {n for n, role in pair.roles.items() if role.trainable} == set(r.trained)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_determinism(tmp_path, method):
    data = CASES[method]
    run(data, tmp_path / "a")
    run(data, tmp_path / "b")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert "target/test_acc" in a[-1]
    assert_same_metrics(a, b, tol=0.0)
    names = PairState.build(parse_config(data)).method.epoch_metric_names
    assert all(set(names) <= r.keys() for r in a), "a declared epoch metric is missing from a record"
    run({**data, "seed": 1}, tmp_path / "c")
    c = read_metrics(tmp_path / "c")
    diff = [k for k, v in numeric_items(a[-1]).items() if k not in ("epoch", "step") and v != c[-1].get(k)]
    assert diff, "seed 1 gave exactly the metrics of seed 0"
    assert "target/train_loss" in diff


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_resume_equals_straight_run(tmp_path, method):
    data = CASES[method]
    straight = run(data, tmp_path / "straight")
    first = run(data, tmp_path / "resumed", stop_after_epochs=1)
    assert first == {} or first["epochs"] == 1
    assert len(read_metrics(tmp_path / "resumed")) == 1
    resumed = run(data, tmp_path / "resumed", resume=True)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert len(a) == data["recipe"]["epochs"]
    assert_same_metrics(a, b, tol=1e-6)
    drop = lambda f: {k: v for k, v in f.items() if k != "wall_s"}  # noqa: E731
    assert drop(straight) == pytest.approx(drop(resumed), abs=1e-6)
    again = run(data, tmp_path / "resumed", resume=True)  # a finished run: nothing more happens
    assert drop(again) == drop(resumed) and len(read_metrics(tmp_path / "resumed")) == len(a)


def _params(pair: PairState) -> dict[str, torch.Tensor]:
    return {f"{r}.{k}": v.detach().clone() for r, role in pair.roles.items()
            for k, v in role.model.state_dict().items()}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_state_round_trip(method):
    cfg = parse_config(CASES[method])
    a = PairState.build(cfg)
    for step in range(3):
        take_step(a, step)
    a.step = 3
    buf = io.BytesIO()  # through bytes, as a checkpoint goes (no tensor shared with ``a``)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = PairState.build(cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(3, 6):  # both continue: the same batches, RNG draws and method state
        take_step(a, step)
        take_step(b, step)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.allclose(pa[k].float(), pb[k].float(), atol=1e-6), k


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_one_role_hosting_equals_pair_hosting(method):
    """The pair builds the roles ``roles()`` names. Where they may run apart, each role hosted
    by a pair of its own (sharing one exchange built from the spec, as the Ray adapter actor
    does) takes the same steps as the whole pair in one host. In one thread the roles step in
    ``needed`` order, source first (a sync exchange's ``get`` waits for every ``put`` of its
    step: a link into the source would wait here; the Ray test below runs them concurrently)."""
    cfg = parse_config(CASES[method])
    a = PairState.build(cfg)
    where = a.method.roles(a.method.options)
    assert tuple(a.roles) == where.needed
    if not where.apart:
        return
    apart = {r: PairState.build(cfg, role_names=(r,)) for r in where.needed}
    spec = a.method.exchange_spec()
    if spec is not None:
        exchange = a.method.build_exchange(spec, a.steps_per_epoch)
        for b in apart.values():
            b.method.attach(exchange)
    for step in range(4):
        take_step(a, step)
        for b in apart.values():
            take_step(b, step)
    pa = _params(a)
    pb = {k: v for b in apart.values() for k, v in _params(b).items()}
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_sync_ray_equals_engine(ray_local, tmp_path, method):
    """On Ray the engine's metrics: roles that may run apart in their own Ray Train workers
    (and the method's exchange in an actor), other methods co-located in one worker."""
    from orchestrator.config import parse_config as parse_pair
    from orchestrator.topology.split.driver import run_pair_on_ray
    from orchestrator.topology.split.plan import plan_pair

    data = {**CASES[method], "ray": {"cpus_per_worker": 0.5}}
    cfg = parse_pair(data)
    plan = plan_pair(cfg)
    where = method_roles(cfg)
    assert plan.co_located == (not where.apart)
    assert plan.layout == (["target"] if not where.apart else [r for r in ("target", "source") if r in where.needed])
    Engine(cfg, tmp_path / "engine", progress=False).run()
    run_pair_on_ray(cfg, tmp_path / "ray", plan=plan)
    assert_same_metrics(read_metrics(tmp_path / "engine"), read_metrics(tmp_path / "ray"), tol=1e-5)


def test_golden_file_has_every_case():
    assert set(json.loads(GOLDEN.read_text())) == set(GOLDEN_CASES), "run python tests/make_golden.py"


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_metrics_equal_recorded(tmp_path, case):
    """Every step's train stats and state sums, and every epoch record, as recorded."""
    want = json.loads(GOLDEN.read_text())[case]
    got = step_metrics(GOLDEN_CASES[case], tmp_path)
    assert_same_metrics(want["steps"], got["steps"], tol=1e-6)
    assert_same_metrics(want["epochs"], got["epochs"], tol=1e-6)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_fast_validation_accepts_every_case(method):
    """The method's ``setup`` and ``ready`` on the weightless models (``mergenet validate``
    without ``--deep``) find nothing wrong with a config the full build accepts."""
    from mergenet_core.config.weightless import check_pair_shapes

    warnings: list[str] = []
    assert check_pair_shapes(parse_config(CASES[method]), warnings) == []


def test_core_has_no_import_cycle():
    helpers.assert_no_import_cycle("mergenet_core")


def test_validating_a_pair_imports_no_ray_or_mlflow(tmp_path):
    import subprocess
    import sys

    from helpers import write_yaml

    path = write_yaml(tmp_path / "pair.yaml", {**CASES["mergenet"], "ray": {"cpus_per_worker": 0.5}})
    code = ("import sys; from orchestrator.config import load_config; load_config(sys.argv[1]); "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "[]"


def test_no_file_outside_a_method_names_it():
    """Hosts, grids and reports reach methods only through the contract (``alone`` is the
    report's default baseline arm name, not a code path)."""
    import re

    root = helpers.ROOT
    files = [*(root / "orchestrator").rglob("*.py"),
             *(f for f in (root / "mergenet_core").rglob("*.py") if "methods" not in f.parts)]
    pattern = re.compile(r"""isinstance\([^)]*\b(MergeNet|KD|DML|ParamShare|Alone)\b|methods\.(mergenet|kd|dml|param_share)\b"""
                         r"""|["'](mergenet|kd|dml|param_share|alone)["']""")
    hits = [f"{f.relative_to(root)}: {line.strip()[:80]}" for f in files for line in f.read_text().splitlines()
            if pattern.search(line)
            and "baseline" not in line  # the report's default baseline arm is named alone
            and 'name: str = "alone"' not in line  # the config's default method (a value, not a branch)
            and not (f.parent.name == "cli" and line.startswith("PROG = ")) and ".cache" not in line]  # the program's name
    assert not hits, hits


def test_checkpoint_policy_is_the_same_on_every_host(ray_local, tmp_path):
    """``checkpoint_every`` and the best-validation bundles: the engine and the Ray role workers
    write bundles at the same epochs (the loop decides, not the host)."""
    from mergenet_core.training.engine import load_bundle
    from orchestrator.config import parse_config as parse_pair
    from orchestrator.topology.split.driver import run_pair_on_ray

    data = tiny_pair("alone", source_model=None, checkpoint_every=2, recipe={"epochs": 5, "steps_per_epoch": 2},
                     ray={"cpus_per_worker": 0.5})
    cfg = parse_pair(data)
    written: list[int] = []
    Engine(cfg, tmp_path / "engine", progress=False, keep_bundles="all",
           on_checkpoint=lambda path, record: written.append(int(record["epoch"]))).run()
    run_pair_on_ray(cfg, tmp_path / "ray", keep_bundles="all")
    kept = sorted(load_bundle(b)["epoch"] for b in (tmp_path / "ray" / "ray" / "pair").glob("checkpoint_*/pair.pt"))
    assert {2, 4, 5} <= set(written)  # every 2nd epoch and the last, plus new best-validation epochs
    assert kept == sorted(written)
    assert_same_metrics(read_metrics(tmp_path / "engine"), read_metrics(tmp_path / "ray"), tol=1e-5)


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_weightless_plan_equals_the_full_plan(case):
    """A split grid trial plans its pair from the weightless build (orchestrator/topology/split.py):
    the same worker layout, exchange spec, steps per epoch and warnings as the full CPU build."""
    from orchestrator.config import parse_config as parse_pair
    from orchestrator.topology.split.plan import plan_pair

    cfg = parse_pair(GOLDEN_CASES[case])
    assert plan_pair(cfg, deep=False) == plan_pair(cfg, deep=True)
