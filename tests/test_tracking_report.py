"""The report on MLflow: each parent run carries its group's plots, and one summary run per preset
carries report.md, a self-contained report.html and every plot (a real SQLite store)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from tests.test_report import _tskd_preset, _write_tskd_runs


def test_parents_carry_their_plots_and_a_summary_run_carries_the_report(tmp_path, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tskd.reporting.publish import log_report
    from tskd.reporting.report import write_report
    from tskd.tracking.runs import prepare_store

    p = _tskd_preset(tmp_path)
    parents = prepare_store(p)  # the DAG's set-up: the experiment and a parent per group
    _write_tskd_runs(p, 60.0)
    write_report(p)
    n, summary = log_report(p)
    client = MlflowClient(mlflow_uri)
    assert n == len(parents) == 4  # the teacher, the student alone, kd, tskd

    def plots(run_id: str) -> set[str]:
        return {a.path.removeprefix("plots/") for a in client.list_artifacts(run_id, "plots")}

    assert plots(parents["teacher:resnet20"]) == {"teachers-test_top1.png"}
    assert plots(parents["kd:resnet20-resnet8:student"]) == {"student-resnet20-resnet8-test_top1.png",
                                                             "student-kd-losses.png"}
    assert plots(parents["tskd:resnet20-resnet8:student"]) == {
        "student-resnet20-resnet8-test_top1.png", "student-tskd-losses.png",
        "student-resnet20-resnet8-tskd-attention.png"}

    run = client.get_run(summary)
    assert run.info.run_name == "report smoke" and run.info.status == "FINISHED"
    assert run.data.tags["run_kind"] == "report" and "mlflow.parentRunId" not in run.data.tags
    top = {a.path for a in client.list_artifacts(summary)}
    assert {"report.md", "report.html", "report.csv", "plots"} <= top
    assert plots(summary) >= {"teachers-test_top1.png", "student-resnet20-resnet8-test_top1.png"}
    # The report's summary files as metrics: kd's mean best top-1 on the pair (epoch 3: 30 + 2 + seed).
    assert run.data.metrics["kd.student.resnet20-resnet8.best"] == 32.5
    # report.html: the tables rendered, every plot inlined (the page shows whole on its own).
    html = Path(client.download_artifacts(summary, "report.html", str(tmp_path))).read_text()
    assert "<table>" in html and "<h1>" in html and 'src="plots/' not in html
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(inlined) == html.count("<img") >= 3
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in inlined)
    # A second report updates the same summary run, sending only the files whose bytes changed.
    sent = []
    real = MlflowClient.log_artifact
    monkeypatch.setattr(MlflowClient, "log_artifact", lambda self, rid, path, folder=None: (
        sent.append((rid, Path(path).name)), real(self, rid, path, folder))[1])
    assert log_report(p)[1] == summary and sent == []
    teachers = p.out / "plots" / "teachers-test_top1.png"
    teachers.write_bytes(teachers.read_bytes() + b"\0")
    assert log_report(p)[1] == summary
    assert sorted(sent) == sorted([(parents["teacher:resnet20"], teachers.name), (summary, teachers.name)])


def test_a_parents_duration_is_its_childrens_span(tmp_path, mlflow_uri):
    """The parent is made at the DAG's start and finished by the report; MLflow's Duration column
    then showed the whole DAG. After the report it starts with its first child and ends with its
    last, its children nested under it (a real SQLite store)."""
    from mlflow.tracking import MlflowClient

    from tskd.reporting.publish import summarize_parents
    from tskd.tracking.runs import KIND_TAG, PARENT_TAG, find_parent_id, prepare_store

    p = _tskd_preset(tmp_path)
    group = "kd:resnet20-resnet8:student"
    made = prepare_store(p)[group]
    client = MlflowClient(mlflow_uri)
    exp_id = client.get_run(made).info.experiment_id
    t0 = client.get_run(made).info.start_time
    # Children as a job's journal makes them: tagged with the parent, started and ended at their own times
    # (in ms); a killed first attempt of seed 0 is a child too.
    kids = []
    for status, start, end, seed in [("KILLED", 60_000, 70_000, 0), ("FINISHED", 80_000, 500_000, 0),
                                     ("FINISHED", 90_000, 900_000, 1)]:
        rid = client.create_run(exp_id, start_time=t0 + start, tags={
            KIND_TAG: "train", PARENT_TAG: made, "seed": str(seed)}).info.run_id
        client.log_metric(rid, "best_top1", 30.0 + seed)
        client.set_terminated(rid, status, end_time=t0 + end)
        kids.append(rid)

    assert summarize_parents(p, ["best_top1"]) == 1
    pid = find_parent_id(client, exp_id, p.preset, group)
    parent = client.get_run(pid)
    assert (parent.info.start_time, parent.info.end_time) == (t0 + 60_000, t0 + 900_000)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_seeds"] == 2
    assert parent.info.run_name == client.get_run(made).info.run_name and parent.data.tags["group"] == group
    assert {client.get_run(k).data.tags[PARENT_TAG] for k in kids} == {pid}
    assert len(client.search_runs([exp_id], f"tags.group = '{group}'")) == 1  # the DAG's one is gone
    assert summarize_parents(p, ["best_top1"]) == 1  # a second report keeps it
    assert find_parent_id(client, exp_id, p.preset, group) == pid
