"""Paired statistics of ``mergenet report`` on hand-made numbers (no Ray): the t-interval
against values computed by hand, the power of the paired t-test (minimum detectable effect,
seeds needed) against R's ``pwr``, seed matching, hyperparameter matching, and the whole report
on trial runs written to a real MLflow (sqlite) — Parquet, report.md, parent-run metrics,
child-run gains and the docs/RESULTS.md section."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from orchestrator.tracking import paired
from orchestrator.tracking import verdicts as vd

# t(0.975, df) from a printed table
T975 = {2: 4.302653, 4: 2.776445}


def test_t_interval_matches_hand_computation():
    mean, sd, lo, hi = paired.t_interval([0.02, 0.03, 0.04, 0.05, 0.06])
    half = T975[4] * math.sqrt(0.00025) / math.sqrt(5)  # sample sd = sqrt(0.00025)
    assert mean == pytest.approx(0.04) and sd == pytest.approx(math.sqrt(0.00025))
    assert (lo, hi) == (pytest.approx(0.04 - half), pytest.approx(0.04 + half))
    assert paired.excludes_zero(lo, hi) is True  # [+2.04, +5.96] points

    mean, sd, lo, hi = paired.t_interval([0.01, 0.02, 0.03])
    assert (lo, hi) == (pytest.approx(0.02 - T975[2] * 0.01 / math.sqrt(3)),
                        pytest.approx(0.02 + T975[2] * 0.01 / math.sqrt(3)))
    assert paired.excludes_zero(lo, hi) is False  # [-0.48, +4.48] points

    assert paired.excludes_zero(*paired.t_interval([-0.05, -0.04, -0.06])[2:]) is True
    mean, sd, lo, hi = paired.t_interval([0.01])
    assert mean == 0.01 and math.isnan(sd) and paired.excludes_zero(lo, hi) is None
    assert math.isnan(paired.t_interval([])[0])


def test_power_of_the_paired_t_test_matches_r_pwr():
    # R: pwr.t.test(n = 10, d = 1, sig.level = 0.05, type = "one.sample") -> power = 0.8030962
    assert paired.power_paired(1.0, 1.0, 10) == pytest.approx(0.8030962, abs=1e-5)
    assert paired.power_paired(0.03, 0.03, 10) == pytest.approx(0.8030962, abs=1e-5)  # only δ / sd matters
    assert paired.power_paired(-1.0, 1.0, 10) == paired.power_paired(1.0, 1.0, 10)  # two-sided
    assert paired.power_paired(0.0, 1.0, 7) == pytest.approx(0.05)  # no effect: rejects at rate α
    # R: pwr.t.test(d = 0.5, power = 0.8, type = "one.sample") -> n = 33.36713; power_paired takes a real n
    from scipy.optimize import brentq

    assert brentq(lambda n: paired.power_paired(0.5, 1.0, n) - 0.8, 2, 200) == pytest.approx(33.36713, abs=1e-3)
    assert paired.power_paired(0.5, 1.0, 33) < 0.8 < paired.power_paired(0.5, 1.0, 34)
    assert paired.n_needed(0.5, 1.0) == 34 and paired.n_needed(0.005, 0.01) == 34 and paired.n_needed(-0.5, 1.0) == 34
    # R: pwr.t.test(n = 5, power = 0.8, type = "one.sample") -> d = 1.681997
    d5 = paired.mde_paired(1.0, 5)
    assert d5 == pytest.approx(1.682, abs=1e-3) and paired.power_paired(d5, 1.0, 5) == pytest.approx(0.8, abs=1e-6)
    assert paired.mde_paired(0.02, 5) == pytest.approx(0.02 * d5, rel=1e-9)  # in the units of sd
    # n = 2 (df = 1: scipy's nct.cdf is NaN in that lower tail; the power must not be)
    d2 = paired.mde_paired(1.0, 2)
    assert 10 < d2 < 20 and paired.power_paired(d2, 1.0, 2) == pytest.approx(0.8, abs=1e-6)
    mdes = [paired.mde_paired(0.02, n) for n in range(2, 41)]
    assert all(a > b for a, b in zip(mdes, mdes[1:]))  # more seeds, smaller detectable effect
    assert [paired.n_needed(m, 0.02) for m in mdes] == list(range(2, 41))  # n_needed inverts mde_paired
    assert paired.n_needed(paired.mde_paired(0.02, 5) * 1.001, 0.02) == 5
    assert paired.n_needed(paired.mde_paired(0.02, 5) * 0.999, 0.02) == 6
    # a stricter level or more power needs more seeds
    assert paired.mde_paired(1.0, 10, alpha=0.01) > paired.mde_paired(1.0, 10) > paired.mde_paired(1.0, 10, power=0.5)
    assert paired.n_needed(0.5, 1.0, power=0.9) > 34


def test_power_edge_cases():
    assert math.isnan(paired.mde_paired(0.01, 1)) and math.isnan(paired.mde_paired(math.nan, 5))
    assert math.isnan(paired.power_paired(0.01, 0.01, 1)) and math.isnan(paired.n_needed(0.01, math.nan))
    assert paired.mde_paired(0.0, 3) == 0.0 and paired.n_needed(0.01, 0.0) == 2  # no seed noise at all
    assert paired.power_paired(0.01, 0.0, 3) == 1.0 and paired.power_paired(0.0, 0.0, 3) == 0.05
    assert paired.n_needed(0.01, 0.0005) == 2 and paired.n_needed(0.01, 0.001) == 3  # d = 20 / 10 (n = 2 needs 11.5)
    assert paired.n_needed(1e-4, 0.1) == math.inf  # d = 0.001 needs ~7.8 million seeds: beyond N_MAX
    with pytest.raises(ValueError, match="effect"):
        paired.n_needed(0.0, 0.01)
    with pytest.raises(ValueError, match="power"):
        paired.mde_paired(0.01, 5, power=0.01)
    with pytest.raises(ValueError, match="alpha"):
        paired.power_paired(0.01, 0.01, 5, alpha=1.5)


def _trials(rows):
    """rows: (pair, arm, seed, final, best_val[, status]) -> the report's trial frame."""
    out = []
    for r in rows:
        pair, arm, seed, final, best = r[:5]
        out.append({"pair": pair, "arm": arm, "seed": seed, "status": r[5] if len(r) > 5 else "FINISHED",
                    "target/final_test_acc": final, "target/test_acc_at_best_val": best})
    return pd.DataFrame(out)


def test_paired_table_pairs_by_seed_not_by_mean():
    # mergenet is 1 point above alone at every seed, although seed noise (±10 points) swamps the means
    df = _trials([("p", "alone", s, b, b) for s, b in enumerate([0.50, 0.70, 0.60, 0.80, 0.65])] +
                 [("p", "mergenet", s, b + 0.01, b) for s, b in enumerate([0.50, 0.70, 0.60, 0.80, 0.65])] +
                 [("p", "kd", 0, 0.52, 0.50), ("p", "kd", 1, 0.69, 0.70),
                  ("p", "kd", 2, 0.99, 0.99, "FAILED"),  # a failed trial never counts
                  ("p", "kd", 7, 0.99, 0.99)])  # no alone at seed 7: not paired
    t = paired.paired_table(df, "alone")
    m = t[(t["arm"] == "mergenet") & (t["epoch"] == "final")].iloc[0]
    assert m["n"] == 5 and m["seeds"] == [0, 1, 2, 3, 4]
    # the same +1 point at every seed: no spread, so no interval and no power (not a zero-width "shown")
    assert m["mean_diff"] == pytest.approx(0.01) and m["sd_diff"] == pytest.approx(0, abs=1e-12)
    assert m["identical"] and m["excludes_zero"] is None and math.isnan(m["ci_low"]) and math.isnan(m["ci_high"])
    b = t[(t["arm"] == "mergenet") & (t["epoch"] == "best_val")].iloc[0]
    assert b["mean_diff"] == pytest.approx(0) and b["identical"] and b["excludes_zero"] is None  # 0 at every seed
    k = t[(t["arm"] == "kd") & (t["epoch"] == "final")].iloc[0]
    assert k["n"] == 2 and k["seeds"] == [0, 1] and k["diffs"] == pytest.approx([0.02, -0.01])
    assert k["mean_diff"] == pytest.approx(0.005)
    half = 12.706205 * math.sqrt(((0.015) ** 2 * 2) / 1) / math.sqrt(2)  # t(0.975, 1) = 12.706205
    assert (k["ci_low"], k["ci_high"]) == (pytest.approx(0.005 - half), pytest.approx(0.005 + half))
    assert list(t["arm"].unique()) == ["mergenet", "kd"]  # mergenet first, baseline not compared to itself
    # power: identical differences -> no MDE and no seeds needed; kd from its sd at n = 2
    assert math.isnan(m["mde"]) and math.isnan(m["n_needed"]) and not k["identical"]
    assert (m["level"], m["power"], m["effect"]) == (0.95, 0.8, 0.01)
    sd_k = 0.015 * math.sqrt(2)
    assert k["mde"] == pytest.approx(paired.mde_paired(sd_k, 2)) and k["n_needed"] == paired.n_needed(0.01, sd_k)
    assert paired.power_paired(k["mde"], sd_k, 2) == pytest.approx(0.8, abs=1e-6)
    t2 = paired.paired_table(df, "alone", effect=0.05)
    assert (t2["effect"] == 0.05).all() and (t2["n_needed"].dropna() <= t["n_needed"].dropna()).all()
    single = paired.paired_table(_trials([("p", "alone", 0, 0.5, 0.5), ("p", "kd", 0, 0.6, 0.6)]), "alone")
    assert single["mde"].isna().all() and single["n_needed"].isna().all()  # n = 1: no sd, no power


def test_control_arm_vs_arm_and_missing_baseline():
    df = _trials([("p", "alone", s, 0.6, 0.6) for s in range(3)] +
                 [("p", "mergenet", s, 0.62 + 0.01 * s, 0.6) for s in range(3)] +
                 [("p", "mergenet_untrained", s, 0.61, 0.6) for s in range(3)] +
                 [("q", "mergenet", 0, 0.7, 0.7)])  # pair q has no alone: nothing to compare
    t = paired.paired_table(df, "mergenet_untrained", arms=["mergenet"])
    assert set(t["pair"]) == {"p"} and set(t["arm"]) == {"mergenet"}
    f = t[t["epoch"] == "final"].iloc[0]
    assert f["diffs"] == pytest.approx([0.01, 0.02, 0.03]) and f["baseline"] == "mergenet_untrained"
    assert f["arm_mean"] == pytest.approx(0.63) and f["baseline_mean"] == pytest.approx(0.61)
    assert set(paired.paired_table(df, "alone")["pair"]) == {"p"}


def test_search_axes_pair_with_the_same_hyperparameters():
    rows = []
    for s in range(3):
        for lr, bump in (("0.001", 0.01), ("0.01", -0.02)):
            rows.append({"pair": "p", "arm": "alone", "seed": s, "hp.recipe.optimizer.lr": lr, "bump": 0})
            rows.append({"pair": "p", "arm": "mergenet", "seed": s, "hp.recipe.optimizer.lr": lr, "bump": bump})
    df = pd.DataFrame(rows).assign(status="FINISHED")
    df["target/final_test_acc"] = 0.5 + 0.1 * df["seed"] + (df["hp.recipe.optimizer.lr"] == "0.01") * 0.05 + df["bump"]
    df["target/test_acc_at_best_val"] = df["target/final_test_acc"]
    t = paired.paired_table(df, "alone")
    f = t[t["epoch"] == "final"].set_index("hp")
    assert f.loc["lr=0.001", "diffs"] == pytest.approx([0.01] * 3)
    assert f.loc["lr=0.01", "diffs"] == pytest.approx([-0.02] * 3)
    assert f.loc["lr=0.01", "identical"] and f.loc["lr=0.01", "excludes_zero"] is None  # -2 at every seed
    d = paired.per_trial_diffs(df, "alone")
    got = d[d["arm"] == "mergenet"]["gain_vs_alone/final_test_acc"]  # points
    assert got.tolist() == pytest.approx([1.0, -2.0] * 3)
    assert d[d["arm"] == "alone"]["gain_vs_alone/final_test_acc"].isna().all()


def test_write_section_replaces_only_its_own_section(tmp_path):
    from orchestrator.tracking.publish import write_section

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nintro\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    assert write_section(md, "Study: image", "first body") == "study-image"
    write_section(md, "Study: image", "second body")
    text = md.read_text()
    assert text.count("<!-- study-image:start -->") == 1 and "second body" in text and "first body" not in text
    assert "## Study: image" in text and "keep me" in text and text.startswith("# Results\n\nintro")
    write_section(tmp_path / "new" / "R.md", "X", "b")
    assert "<!-- x:start -->\n## X\n\nb\n<!-- x:end -->" in (tmp_path / "new" / "R.md").read_text()


def test_report_on_mlflow_runs(tmp_path, monkeypatch):
    """The whole report from trial runs in a real MLflow (sqlite): trials.parquet with
    hyperparameter columns and per-seed differences, paired.parquet, report.md, parent-run
    metrics and artifacts, child-run gains, a RESULTS.md section and the forest plot."""
    from mlflow.entities import Metric, Param

    from orchestrator import tracking
    from orchestrator.tracking.report import make_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client()
    exp = tracking.ensure_experiment(c, "g-stats")
    parent = c.create_run(exp, run_name="sub", tags={"mergenet.kind": "submission"}).info.run_id
    acc = {"alone": [0.60, 0.70, 0.65], "mergenet": [0.62, 0.72, 0.66], "mergenet_untrained": [0.61, 0.70, 0.66]}
    runs = {}
    for arm, values in acc.items():
        for seed, v in enumerate(values):
            tags = {"mlflow.parentRunId": parent, "mergenet.trial": "1", "mergenet.pair": "r18-mbv2",
                    "mergenet.arm": arm, "mergenet.method": "alone" if arm == "alone" else "mergenet",
                    "mergenet.seed": str(seed), "mergenet.source": "-" if arm == "alone" else "resnet18@fmnist",
                    "mergenet.target": "mobilenetv2@fmnist"}
            r = c.create_run(exp, run_name=f"{arm} s{seed}", tags=tags).info.run_id
            c.log_batch(r, metrics=[Metric("target/final_test_acc", v, 0, 4),
                                    Metric("target/test_acc_at_best_val", v - 0.01, 0, 4)],
                        params=[Param("seed", str(seed)), Param("recipe.optimizer.lr", "0.05"),
                                Param("method.name", tags["mergenet.method"])])
            c.set_terminated(r, "FINISHED")
            runs[(arm, seed)] = r
    c.set_terminated(parent, "FINISHED")

    md_path = tmp_path / "docs" / "RESULTS.md"
    rep = make_report("g-stats", tmp_path / "out", controls=["mergenet_untrained"], results_md=str(md_path),
                      section="Study: test")
    text = rep["text"]
    assert "Paired differences to `alone`" in text and "Paired differences to `mergenet_untrained`" in text
    # mergenet − alone: +2, +2, +1 points; mean +1.67, sd 0.577 -> ± 4.303*0.577/sqrt(3) = ± 1.43
    assert "| r18-mbv2 (resnet18@fmnist → mobilenetv2@fmnist) | mergenet | 3 | +1.67 [+0.23, +3.10] | yes, above 0" in text
    # mergenet − untrained control: +1, +2, 0 -> +1.00 [-1.48, +3.48]
    assert "| mergenet | 3 | +1.00 [-1.48, +3.48] | no (CI includes 0)" in text
    assert "0: +2.00, 1: +2.00, 2: +1.00" in text
    # sd 0.577 points at n = 3: MDE 1.88 points; 1 point needs 5 seeds; the untrained control: sd 1 point -> 3.26, 10
    assert "| MDE at power 0.8, final / best-val | seeds for 1 point, final / best-val |" in text
    assert "| yes, above 0 | +1.67 [+0.23, +3.10] | yes, above 0 | 1.88 / 1.88 | 5 / 5 |" in text
    assert "| no (CI includes 0) | 3.26 / 3.26 | 10 / 10 |" in text

    trials = pd.read_parquet(rep["parquet"])
    assert trials["param.recipe.optimizer.lr"].tolist() == [0.05] * 9  # hyperparameters as (numeric) columns
    m = trials[trials["arm"] == "mergenet"].sort_values("seed")
    # the per-seed gain in points, under the name of the same number on the MLflow run
    assert m["gain_vs_alone/final_test_acc"].tolist() == pytest.approx([2.0, 2.0, 1.0])
    assert m["gain_vs_mergenet_untrained/final_test_acc"].tolist() == pytest.approx([1.0, 2.0, 0.0])
    pt = pd.read_parquet(rep["paired"])
    assert set(zip(pt["arm"], pt["baseline"])) == {("mergenet", "alone"), ("mergenet_untrained", "alone"),
                                                   ("mergenet", "mergenet_untrained")}
    assert len(pt) == 6  # × final, best_val

    pm = c.get_run(parent).data.metrics
    key = "paired/mergenet_vs_alone/r18-mbv2/final"
    assert pm[f"{key}/mean_diff"] == 1.667 and pm[f"{key}/n"] == 3  # points, rounded to 0.001
    assert pm[f"{key}/excludes_zero"] == 1
    assert pm[f"{key}/mde"] == round(100 * paired.mde_paired(math.sqrt(1 / 3) / 100, 3), 3) and pm[f"{key}/n_needed"] == 5
    assert pm["paired/mergenet_vs_mergenet_untrained/r18-mbv2/final/excludes_zero"] == 0
    arts = {f.path for f in c.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/trials.parquet", "report/paired.parquet", "report/history.parquet",
            "report/forest.png", "report/forest.json"} <= arts
    child = c.get_run(runs[("mergenet", 0)]).data.metrics
    assert child["gain_vs_alone/final_test_acc"] == pytest.approx(2.0)  # points
    assert child["gain_vs_alone/test_acc_at_best_val"] == pytest.approx(2.0)
    assert c.get_metric_history(runs[("mergenet", 0)], "gain_vs_alone/final_test_acc")[0].step == 0
    assert "gain_vs_alone/final_test_acc" not in c.get_run(runs[("alone", 0)]).data.metrics

    section = md_path.read_text()
    assert "<!-- study-test:start -->\n## Study: test" in section and "### Paired differences to `alone`" in section
    make_report("g-stats", tmp_path / "out", results_md=str(md_path), section="Study: test")  # rewritten in place
    again = md_path.read_text()
    assert again.count("<!-- study-test:start -->") == 1 and "mergenet_untrained` (same seed)" not in again
    assert len(c.get_metric_history(runs[("mergenet", 0)], "gain_vs_alone/final_test_acc")) == 1  # not re-logged
    with pytest.raises(Exception, match="no arm 'nosuch'"):
        make_report("g-stats", tmp_path / "out", controls=["nosuch"])
    with pytest.raises(Exception, match="--effect"):
        make_report("g-stats", tmp_path / "out", effect=0)
    rep2 = make_report("g-stats", tmp_path / "out2", effect=2.0)
    assert "seeds for 2 points" in rep2["text"] and (pd.read_parquet(rep2["paired"])["effect"] == 0.02).all()


def test_report_without_alone_arm_still_writes_the_means(tmp_path, monkeypatch):
    from mlflow.entities import Metric

    from orchestrator import tracking
    from orchestrator.tracking.report import make_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client()
    exp = tracking.ensure_experiment(c, "g-noalone")
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = c.create_run(exp, tags={"mergenet.kind": "submission"}).info.run_id
    for seed in (0, 1):
        r = c.create_run(exp, tags={"mlflow.parentRunId": parent, "mergenet.trial": "1", "mergenet.pair": "p",
                                    "mergenet.method": "mergenet", "mergenet.seed": str(seed),
                                    "mergenet.target": "cnn@fmnist"}).info.run_id
        c.log_batch(r, metrics=[Metric("target/final_test_acc", 0.5, 0, 1)])
        c.set_terminated(r, "FINISHED")
    rep = make_report("g-noalone", tmp_path / "out")
    assert "50.00 ± 0.00 (n=2)" in rep["text"] and "No `alone` arm" in rep["text"] and rep["forest"] is None
    with pytest.raises(Exception, match="no arm 'ctl'"):
        make_report("g-noalone", tmp_path / "out", controls=["ctl"])


def test_transfer_verdicts_need_the_baseline_and_the_control():
    base = [0.60, 0.70, 0.65, 0.62, 0.68]
    rows = [("p", "alone", s, b, b) for s, b in enumerate(base)]
    # shown: +2 points over alone and over its control at every seed (small jitter)
    rows += [("p", "mergenet", s, b, b + 0.02 + 0.001 * s) for s, b in enumerate(base)]
    rows += [("p", "mergenet_untrained", s, b, b + 0.001 * (s % 2)) for s, b in enumerate(base)]
    # not shown: above alone, but no better than its own control
    rows += [("p", "lucky", s, b, b + 0.02 + 0.001 * s) for s, b in enumerate(base)]
    rows += [("p", "lucky_untrained", s, b, b + 0.02 + 0.001 * ((s + 1) % 3)) for s, b in enumerate(base)]
    # harmful: below alone at every seed
    rows += [("p", "bad", s, b, b - 0.03 - 0.001 * s) for s, b in enumerate(base)]
    df = _trials(rows)
    got = vd.transfer_verdicts(
        df, "alone", [("mergenet", "mergenet_untrained"), ("lucky", "lucky_untrained"), ("bad", "mergenet_untrained")])
    assert {x["arm"]: x["word"] for x in got} == {"mergenet": "transfer shown", "lucky": "not shown", "bad": "harmful"}
    v = {x["arm"]: x["verdict"] for x in got}
    assert v["mergenet"].startswith("transfer shown (detectable: ≥ ") and "rules out" not in v["mergenet"]
    assert v["lucky"].startswith("not shown (detectable: ≥ ") and "; rules out gains above +" in v["lucky"]
    assert v["bad"].startswith("harmful (detectable: ≥ ") and v["bad"].endswith(" points)")
    lines = vd.verdict_lines(vd.transfer_verdicts(df, "alone", [("mergenet", "mergenet_untrained")]))
    assert len(lines) == 1 and "transfer shown" in lines[0] and "vs `mergenet_untrained`" in lines[0]
    one = vd.transfer_verdicts(_trials([("p", "alone", 0, 0.6, 0.6), ("p", "mergenet", 0, 0.7, 0.7),
                                            ("p", "mergenet_untrained", 0, 0.6, 0.6)]),
                                   "alone", [("mergenet", "mergenet_untrained")])
    assert one[0]["verdict"] == "not shown (too few paired seeds)" and math.isnan(one[0]["mde"])


def test_verdict_line_says_what_could_be_detected_and_what_is_ruled_out():
    base = [0.60, 0.70, 0.65, 0.62]
    d = [0.01, -0.01, 0.02, 0.0]  # mergenet − alone at the best-val epoch: mean +0.50, sd 1.29 points
    rows = [("p", "alone", s, b, b) for s, b in enumerate(base)]
    rows += [("p", "mergenet", s, b, b + x) for s, (b, x) in enumerate(zip(base, d))]
    rows += [("p", "mergenet_untrained", s, b, b) for s, b in enumerate(base)]
    v = vd.transfer_verdicts(_trials(rows), "alone", [("mergenet", "mergenet_untrained")])[0]
    sd = math.sqrt(5e-4 / 3)
    upper = 0.005 + 3.182446 * sd / 2  # t(0.975, 3) = 3.182446 from a printed table: +2.55 points
    assert v["rules_out_above"] == pytest.approx(upper, abs=1e-6)
    assert v["mde"] == pytest.approx(paired.mde_paired(sd, 4)) and 100 * v["mde"] == pytest.approx(2.747, abs=1e-3)
    assert v["verdict"] == "not shown (detectable: ≥ 2.75 points; rules out gains above +2.55)"
    line = vd.verdict_lines([v])[0]
    assert line.startswith("- **p · mergenet: not shown (detectable: ≥ 2.75 points; rules out gains above +2.55)** — ")
    assert "vs `alone` +0.50 [-1.55, +2.55] (n = 4, detectable ≥ 2.75)" in line


def test_paired_markdown_has_power_columns():
    from orchestrator.tracking.render import paired_markdown

    base = [0.60, 0.70, 0.65, 0.62]
    rows = [("p", "alone", s, b, b) for s, b in enumerate(base)]
    rows += [("p", "mergenet", s, b + x, b + x) for s, (b, x) in enumerate(zip(base, [0.01, -0.01, 0.02, 0.0]))]
    text = paired_markdown(paired.paired_table(_trials(rows), "alone", effect=0.02), {})
    assert "| MDE at power 0.8, final / best-val | seeds for 2 points, final / best-val |" in text
    # sd 1.29 points: MDE 2.75 at n = 4; 2 points (d = 1.55) need 6 seeds at that sd (power 0.74 at 5, 0.85 at 6)
    assert paired.n_needed(0.02, math.sqrt(5e-4 / 3)) == 6
    assert "| no (CI includes 0) | 2.75 / 2.75 | 6 / 6 | 0: +1.00" in text
    assert "seeds for 1 point," in paired_markdown(paired.paired_table(_trials(rows), "alone"), {})


def test_diagnostics_table_lists_arms_with_transfer_metrics():
    from orchestrator.tracking.render import diagnostics_markdown

    df = _trials([("p", "alone", 0, 0.6, 0.6), ("p", "mergenet", 0, 0.6, 0.6), ("p", "mergenet", 1, 0.6, 0.6)])
    assert diagnostics_markdown(df) is None
    df["transfer/0/write_change"] = [None, 0.5, 0.7]
    df["transfer/0/receiver_factor_cos"] = [None, 0.9, 0.8]
    df["adapter/grad_norm"] = [None, 2.0, 4.0]
    table = diagnostics_markdown(df)
    assert "| p | mergenet | 0 | 0.600 | 0.850 | – | – | – | – | 3 | – |" in table and "alone" not in table
    df["transfer/0/feedback_cos"] = [None, 1.0, 0.5]  # the learning signal against the task gradient
    df["adapter/update_ratio"] = [None, 1e-3, 3e-3]
    table = diagnostics_markdown(df)
    assert "feedback cos (vs task gradient)" in table and "adapter update / weight" in table
    assert "| p | mergenet | 0 | 0.600 | 0.850 | – | 0.750 | – | – | 3 | 2.00e-03 |" in table
    df["transfer/0/source_cos"] = [None, 0.9, 0.7]  # does the output move toward the source? and the gate
    df["transfer/0/gate"] = [None, 0.5, 1.0]
    table = diagnostics_markdown(df)
    assert "cos(written, source)" in table and "| 0.750 | 0.800 | 0.750 | 3 |" in table


def test_report_effect_flag_must_be_positive(capsys, tmp_path, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    for bad in ("0", "-1", "nan"):
        assert main(["report", "nosuch", "--effect", bad]) == 2
        assert "--effect" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow is touched


def test_verdicts_count_only_where_a_positive_control_is_shown():
    """A pair whose positive control (transplant) is shown gets MergeNet's verdict; one whose
    positive control is not shown -- or whose positive-control trials all failed -- reads
    'cannot measure', whatever MergeNet's own intervals say."""
    base = [0.60, 0.62, 0.61]
    rows = []
    for pair, pc_gain, pc_status in (("seen", 0.05, "FINISHED"), ("blind", 0.0, "FINISHED"),
                                     ("failed", 0.05, "FAILED")):
        for s, b in enumerate(base):
            rows += [(pair, "alone", s, b, b), (pair, "mergenet", s, b + 0.03 + 0.001 * s, b + 0.03 + 0.001 * s),
                     (pair, "mergenet_untrained", s, b, b),
                     (pair, "transplant", s, b + pc_gain + (0.001 * s if pc_gain else (-1) ** s * 0.01),
                      b + pc_gain + (0.001 * s if pc_gain else (-1) ** s * 0.01), pc_status)]
    df = _trials(rows)
    pos = vd.positive_controls(df, "alone", ["transplant"])
    assert {(v["pair"], v["shown"]) for v in pos} == {("seen", True), ("blind", False)}
    assert vd.positive_control_lines(pos)[0].startswith("- **blind · transplant vs `alone`: not shown** — ")
    out = {v["pair"]: v for v in vd.transfer_verdicts(df, "alone", [("mergenet", "mergenet_untrained")],
                                                          positive=pos, gated=True)}
    assert out["seen"]["word"] == "transfer shown"
    assert out["blind"]["word"] == out["failed"]["word"] == "cannot measure"
    assert out["blind"]["verdict"].startswith("cannot measure (no positive control shown; the arm alone: transfer shown")


def test_report_pictures_follow_the_verdicts(tmp_path, monkeypatch):
    """The forest plot draws the verdicts' numbers (best-validation epoch, each comparison's
    interval and detectable effect, coloured by the verdict); the learning curves and
    history.parquet come from the trials' metrics.jsonl; trials.parquet has ids, times, the
    config hash and real booleans; the parent run's description carries the verdicts."""
    import json

    from mlflow.entities import Metric, Param

    from orchestrator import tracking
    from orchestrator.tracking import figures
    from orchestrator.tracking.report import make_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client()
    exp = tracking.ensure_experiment(c, "g-pics")
    parent = c.create_run(exp, run_name="sub", tags={"mergenet.kind": "submission"}).info.run_id
    # best-val test accuracy per seed: transplant clearly above alone; mergenet above alone but not above its control
    acc = {"alone": [0.60, 0.70, 0.65], "transplant": [0.70, 0.79, 0.76], "mergenet": [0.62, 0.72, 0.66],
           "mergenet_untrained": [0.61, 0.69, 0.67]}
    for arm, values in acc.items():
        for seed, v in enumerate(values):
            tid = f"t_{arm}_{seed}"
            tags = {"mlflow.parentRunId": parent, "mergenet.trial": "1", "mergenet.pair": "p", "mergenet.arm": arm,
                    "mergenet.method": arm.split("_")[0], "mergenet.seed": str(seed), "mergenet.trial_id": tid,
                    "mergenet.config_hash": f"h{arm}{seed}", "mergenet.git_sha": "abc",
                    "mergenet.target": "cnn@fmnist"}
            r = c.create_run(exp, run_name=f"{arm} s{seed}", tags=tags).info.run_id
            c.log_batch(r, metrics=[Metric("target/final_test_acc", v, 0, 0),
                                    Metric("target/test_acc_at_best_val", v, 0, 0)],
                        params=[Param("seed", str(seed)), Param("source.freeze", "True" if arm != "alone" else "None"),
                                Param("target.options.bias", "False")])
            c.set_terminated(r, "FINISHED")
            pair = tmp_path / "runs" / "grids" / "g-pics" / "trials" / tid / "pair"
            pair.mkdir(parents=True)
            hist = [{"epoch": e, "target/val_acc": v * e / 3, "target/test_acc": v * e / 3 - 0.01} for e in (1, 2, 3)]
            (pair / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    c.set_terminated(parent, "FINISHED")

    rep = make_report("g-pics", tmp_path / "out", controls=["mergenet_untrained"], positive=["transplant"],
                      verdict=[("mergenet", "mergenet_untrained")])
    rows = rep["forest_rows"]
    assert [(r["arm"], r["baseline"]) for r in rows] == [
        ("mergenet", "alone"), ("mergenet", "mergenet_untrained"), ("mergenet_untrained", "alone"),
        ("transplant", "alone")]
    verdict = {v["arm"]: v["word"] for v in rep["verdicts"]}["mergenet"]
    assert verdict == "not shown"
    by = {(r["arm"], r["baseline"]): r for r in rows}
    assert by[("mergenet", "alone")]["state"] == by[("mergenet", "mergenet_untrained")]["state"] == verdict
    assert by[("transplant", "alone")]["state"] == "positive control shown"
    assert by[("mergenet_untrained", "alone")]["state"] == "includes 0"
    for (arm, base), r in by.items():  # the numbers of the paired table at the verdict's epoch, in points
        t = rep["tables"][base]
        row = t[(t["arm"] == arm) & (t["epoch"] == "best_val")].iloc[0]
        assert (r["mean"], r["low"], r["high"], r["mde"]) == pytest.approx(
            (100 * row["mean_diff"], 100 * row["ci_low"], 100 * row["ci_high"], 100 * row["mde"]))
        assert r["colour"] == figures.COLOURS[r["state"]] and r["epoch"] == "best_val"
    assert json.loads((tmp_path / "out" / "forest.json").read_text())[0]["arm"] == "mergenet"
    assert rep["forest"].stat().st_size > 10_000

    history = pd.read_parquet(rep["history"])
    assert len(history) == 12 * 3 and set(history["epoch"]) == {1, 2, 3}
    assert {"run_id", "trial_id", "pair", "arm", "seed", "target/val_acc"} <= set(history.columns)
    curves = figures.curve_data(history, "p")
    val = curves["transplant"]["target/val_acc"]
    assert val["mean"].tolist() == pytest.approx([sum(acc["transplant"]) / 3 * e / 3 for e in (1, 2, 3)])
    assert val["n"].tolist() == [3, 3, 3] and rep["curves"]["p"].stat().st_size > 10_000

    trials = pd.read_parquet(rep["parquet"])
    assert str(trials["start_time"].dtype).startswith("datetime64") and trials["end_time"].notna().all()
    assert trials["trial_id"].str.startswith("t_").all() and (trials["parent_run_id"] == parent).all()
    assert (trials["git_sha"] == "abc").all() and trials["config_hash"].str.startswith("h").all()
    assert trials["param.target.options.bias"].dtype == "boolean" and not trials["param.target.options.bias"].any()
    freeze = trials.set_index("arm")["param.source.freeze"]
    assert freeze.dtype == "boolean" and freeze["alone"].isna().all() and freeze["mergenet"].all()
    assert "gain_vs_alone/test_acc_at_best_val" in trials and not [k for k in trials if k.startswith("logged/")]
    assert (pd.read_parquet(rep["paired"])["level"] == 0.95).all()

    note = c.get_run(parent).data.tags["mlflow.note.content"]
    assert "12 finished / 12 trials" in note and "p · mergenet: not shown" in note and "transplant vs `alone`: shown" in note


def test_identical_differences_are_undetermined():
    """Every seed giving the same difference has no spread: the comparison reads *undetermined
    (identical differences)*, with no interval and no MDE, and no verdict is *shown* on it."""
    from orchestrator.tracking.render import paired_markdown

    base = [0.60, 0.70, 0.65, 0.62]
    rows = [("p", "alone", s, b, b) for s, b in enumerate(base)]
    rows += [("p", "same", s, b + 0.02, b + 0.02) for s, b in enumerate(base)]  # +2 points at every seed
    rows += [("p", "jitter", s, b + 0.02 + 0.001 * s, b + 0.02 + 0.001 * s) for s, b in enumerate(base)]
    rows += [("p", "relabelled", s, b + 0.02 + 0.001 * s, b + 0.02 + 0.001 * s) for s, b in enumerate(base)]
    df = _trials(rows)
    t = paired.paired_table(df, "alone")
    same = t[(t["arm"] == "same") & (t["epoch"] == "best_val")].iloc[0]
    assert same["identical"] and same["excludes_zero"] is None and same["mean_diff"] == pytest.approx(0.02)
    assert all(math.isnan(same[k]) for k in ("ci_low", "ci_high", "mde", "n_needed"))
    assert paired.verdict(same) == paired.UNDETERMINED == "undetermined (identical differences)"
    text = paired_markdown(t, {})
    assert "| p | same | 4 | +2.00 (identical differences) | undetermined (identical differences) |" in text
    got = {(v["arm"], v["control"]): v for v in vd.transfer_verdicts(
        df, "alone", [("same", "jitter"), ("jitter", "relabelled"), ("jitter", "same")])}
    # against the baseline: undetermined, whatever the control says
    assert got[("same", "jitter")]["word"] == paired.UNDETERMINED and math.isnan(got[("same", "jitter")]["mde"])
    # above `alone`, but identical to its control (a control that is the arm relabelled): not shown on it
    assert got[("jitter", "relabelled")]["verdict"] == paired.UNDETERMINED
    line = vd.verdict_lines([got[("jitter", "relabelled")]])[0]
    assert "vs `relabelled` +0.00 (identical differences) (n = 4)" in line
    assert got[("jitter", "same")]["word"] == "not shown"  # a real interval against a control that includes 0
    pos = vd.positive_controls(df, "alone", ["same"])
    assert pos[0]["shown"] is None and "not shown (identical differences)" in vd.positive_control_lines(pos)[0]


def _mlflow_grid(tmp_path, monkeypatch, name: str, trials: list[dict]):
    """A submission of trial runs in a real MLflow (sqlite) under ``tmp_path`` (the working
    directory): each trial a dict with ``pair``, ``arm``, ``seed``, ``best`` (the test accuracy
    at the best-validation epoch, also the final one) and optionally ``status`` (FAILED: ended
    through :func:`tracking.end_run` with ``reason``), ``hp`` (search-axis params), ``tags`` and
    ``history`` (its ``metrics.jsonl`` in the grid's folder). Returns the client."""
    import json

    from mlflow.entities import Metric, Param

    from orchestrator import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client()
    exp = tracking.ensure_experiment(c, name)
    parent = c.create_run(exp, run_name="sub", tags={"mergenet.kind": "submission"}).info.run_id
    for i, t in enumerate(trials):
        tid = f"t{i}"
        tags = {"mlflow.parentRunId": parent, "mergenet.trial": "1", "mergenet.pair": t["pair"],
                "mergenet.arm": t["arm"], "mergenet.method": t["arm"].split("_")[0], "mergenet.seed": str(t["seed"]),
                "mergenet.trial_id": tid, "mergenet.target": "cnn@fmnist", **t.get("tags", {})}
        r = c.create_run(exp, run_name=f"{t['arm']} s{t['seed']}", tags=tags).info.run_id
        c.log_batch(r, params=[Param("seed", str(t["seed"]))] + [Param(f"hp.{k}", str(v)) for k, v in
                                                                 t.get("hp", {}).items()])
        if t.get("status", "FINISHED") == "FINISHED":
            c.log_batch(r, metrics=[Metric(m, t["best"], 0, 0) for m in paired.METRICS.values()])
        tracking.end_run(c, r, ok=t.get("status", "FINISHED") == "FINISHED", reason=t.get("reason"))
        if "history" in t:
            pair = tmp_path / "runs" / "grids" / name / "trials" / tid / "pair"
            pair.mkdir(parents=True)
            (pair / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in t["history"]))
    c.set_terminated(parent, "FINISHED")
    return c


def test_verdict_rests_on_one_seed_set_and_names_what_it_left_out(tmp_path, monkeypatch):
    """The three comparisons of a verdict use the seeds where the arm, `alone` and the control
    all finished; each seed left out is listed with its reason (the run's failure reason), and
    the arm failing where the other two finished is said in the verdict -- in the report, in
    what it returns and in the summary table."""
    from helpers import mergenet_arm, tiny_grid, write_yaml
    from orchestrator.tracking.report import make_report
    from orchestrator.tracking.summary import setting_rows

    base = [0.60, 0.70, 0.65, 0.62, 0.68, 0.66]
    trials = [{"pair": "cnn-cnn", "arm": "alone", "seed": s, "best": b} for s, b in enumerate(base)]
    trials += [{"pair": "cnn-cnn", "arm": "mergenet", "seed": s, "best": b + 0.02 + 0.001 * s} for s, b in
               enumerate(base) if s != 3]
    trials += [{"pair": "cnn-cnn", "arm": "mergenet", "seed": 3, "best": 0, "status": "FAILED",
                "reason": "Traceback ...\nValueError: non-finite adapter outputs at step 12"}]
    trials += [{"pair": "cnn-cnn", "arm": "mergenet_untrained", "seed": s, "best": b + 0.001 * (s % 2)}
               for s, b in enumerate(base) if s != 5]
    trials += [{"pair": "cnn-cnn", "arm": "mergenet_untrained", "seed": 5, "best": 0, "status": "FAILED",
                "reason": "RuntimeError: out of memory"}]
    _mlflow_grid(tmp_path, monkeypatch, "g-seeds", trials)
    rep = make_report("g-seeds", tmp_path / "out", controls=["mergenet_untrained"],
                      verdict=[("mergenet", "mergenet_untrained")])
    v = rep["verdicts"][0]
    assert v["seeds"] == [0, 1, 2, 4] and v["arm_failed"] == [3]
    assert sorted(v["left_out"]) == [(3, "mergenet", "FAILED (ValueError: non-finite adapter outputs at step 12)"),
                                     (5, "mergenet_untrained", "FAILED (RuntimeError: out of memory)")]
    assert v["word"] == "transfer shown"
    assert v["verdict"].endswith("; `mergenet` failed at 1 of the 5 seeds where `alone` and `mergenet_untrained` "
                                 "finished (seed 3)")
    line = next(l for l in rep["text"].splitlines() if l.startswith("- **cnn-cnn · mergenet: "))
    assert line.count("(n = 4, ") == 3, line  # all three comparisons on the same four seeds
    assert line.endswith("On seeds 0, 1, 2, 4; left out: seed 3: `mergenet` FAILED (ValueError: non-finite adapter "
                         "outputs at step 12); seed 5: `mergenet_untrained` FAILED (RuntimeError: out of memory).")
    # the paired table against `alone` keeps every seed mergenet shares with it (it is no verdict)
    t = rep["tables"]["alone"]
    assert t[(t["arm"] == "mergenet") & (t["epoch"] == "best_val")].iloc[0]["seeds"] == [0, 1, 2, 4, 5]

    grid = tiny_grid("g-seeds", methods={"alone": {}, "mergenet": mergenet_arm(), "mergenet_untrained": {
        "method": "mergenet", **mergenet_arm(), "control": "untrained_source"}}, seeds=list(range(6)),
                     report={"controls": ["mergenet_untrained"], "verdicts": ["mergenet:mergenet_untrained"]})
    rows, _ = setting_rows(write_yaml(tmp_path / "g-seeds.yaml", grid))
    row = next(r for r in rows if r[1] == "`mergenet`")
    on_four = paired.paired_row({s: base[s] + 0.02 + 0.001 * s for s in (0, 1, 2, 4)}, dict(enumerate(base)))
    assert row[2] == paired.fmt_diff(on_four) and on_four["n"] == 4  # Δ vs alone: the verdict's seeds, not 5
    assert row[5] == ("**transfer shown** (primary); `mergenet` failed at 1 of the 5 seeds where `alone` and "
                      "`mergenet_untrained` finished (seed 3)")


def test_positive_control_gates_the_verdicts_of_its_own_search_point(tmp_path, monkeypatch):
    """A grid with search axes: the positive control at the verdict's own search point gates it
    (pair `p`: shown at lr=0.01, not at lr=0.1); where the positive control is not searched
    (pair `q`: only the arm and its control carry the axis), the pair's gates every point."""
    from orchestrator.tracking.report import make_report

    base = [0.60, 0.70, 0.65, 0.62]
    trials = []
    for pair, lrs, searched in (("p", (0.01, 0.1), {"alone", "transplant", "mergenet", "mergenet_untrained"}),
                                ("q", (0.01,), {"mergenet", "mergenet_untrained"})):
        for lr in lrs:
            for s, b in enumerate(base):
                gain = {"alone": 0.0, "mergenet": 0.03 + 0.001 * s, "mergenet_untrained": 0.001 * (s % 2),
                        "transplant": 0.05 + 0.001 * s if lr == 0.01 else 0.01 * (-1) ** s}
                for arm, g in gain.items():
                    if arm not in searched and lr != lrs[0]:
                        continue  # an unsearched arm runs once per seed
                    trials.append({"pair": pair, "arm": arm, "seed": s, "best": b + g,
                                   "hp": {"recipe.optimizer.lr": lr} if arm in searched else {}})
    _mlflow_grid(tmp_path, monkeypatch, "g-search", trials)
    rep = make_report("g-search", tmp_path / "out", positive=["transplant"],
                      verdict=[("mergenet", "mergenet_untrained")])
    assert {(v["pair"], v["shown"]) for v in rep["positive_controls"]} == {
        ("p (lr=0.01)", True), ("p (lr=0.1)", False), ("q", True)}
    assert {v["pair"]: v["word"] for v in rep["verdicts"]} == {
        "p (lr=0.01)": "transfer shown", "p (lr=0.1)": "cannot measure", "q (lr=0.01)": "transfer shown"}


def test_scheduler_stopped_trials_are_compared_at_a_common_epoch(tmp_path, monkeypatch):
    """A trial a scheduler stopped early (ASHA; FINISHED, `mergenet.stopped_at_epoch`) is neither
    compared at its own last epoch against full-budget trials nor left out: every comparison of
    its pair is at the last epoch all the pair's finished trials reached, read from their
    per-epoch histories, and the report says so."""
    from orchestrator import tracking
    from orchestrator.tracking.report import make_report

    base = [0.60, 0.70, 0.65]

    def history(b, gain, epochs):  # validation best at the last epoch; test rises 1 point an epoch
        return [{"epoch": e, "step": 3 * e, "target/val_acc": 0.5 + 0.1 * e, "target/test_acc": b + gain + 0.01 * e}
                for e in range(1, epochs + 1)]

    trials = []
    for s, b in enumerate(base):
        for arm, gain in (("alone", 0.0), ("mergenet", 0.02 + 0.001 * s)):
            stopped = arm == "mergenet" and s == 1
            epochs = 2 if stopped else 3
            trials.append({"pair": "p", "arm": arm, "seed": s, "best": b + gain + 0.01 * epochs,
                           "history": history(b, gain, epochs),
                           "tags": {tracking.STOPPED_BY: "scheduler", tracking.STOPPED_AT: "2"} if stopped else {}})
    _mlflow_grid(tmp_path, monkeypatch, "g-stopped", trials)
    rep = make_report("g-stopped", tmp_path / "out")
    t = rep["tables"]["alone"]
    for kind in ("final", "best_val"):  # at epoch 2 for every trial: the gain alone, seed by seed
        r = t[(t["arm"] == "mergenet") & (t["epoch"] == kind)].iloc[0]
        assert r["seeds"] == [0, 1, 2] and r["diffs"] == pytest.approx([0.02, 0.021, 0.022])
    trials_pq = pd.read_parquet(rep["parquet"])
    assert (trials_pq["compared_at_epoch"] == 2).all()
    assert trials_pq["target/final_test_acc"].tolist() == pytest.approx(
        [b + g + 0.02 for b in base for g in (0.0,)] + [b + 0.02 + 0.001 * s + 0.02 for s, b in enumerate(base)])
    assert ("pair `p`: the scheduler stopped 1 of its 6 finished trials before the recipe's last epoch "
            "(`mergenet` s1 at epoch 2); every comparison of this pair is at epoch 2") in rep["text"]
    assert "nothing to pair" not in rep["text"]


def test_the_report_reads_every_trial_page_by_page(tmp_path):
    """One MLflow search returns at most ``max_results`` runs: the report's read step pages through
    all of a submission's trials (a small page here: 7 trials, 3 per call)."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from orchestrator.tracking.records import trials_frame

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("paged")
    parent = c.create_run(exp, tags={"mergenet.kind": "submission"}).info.run_id
    for seed in range(7):
        c.create_run(exp, tags={tracking.TRIAL_TAG: "1", "mlflow.parentRunId": parent, "mergenet.pair": "p",
                                "mergenet.method": "alone", "mergenet.seed": str(seed)})
    c.create_run(exp, tags={tracking.TRIAL_TAG: "1", "mergenet.pair": "p", "mergenet.method": "alone",
                            "mergenet.seed": "99"})  # another submission's trial
    assert sorted(trials_frame(c, exp, parent, page_size=3)["seed"]) == list(range(7))
    assert len(tracking.children(c, exp, parent, page_size=2)) == 7
    assert len(tracking.all_runs(c, exp, f"tags.`{tracking.TRIAL_TAG}` = '1'", page_size=1)) == 8
