"""Where to look: URLs of the MLflow UI's runs view and run pages, and waiting for a server."""

from __future__ import annotations

from typing import Any


def wait_for(url: str, proc: Any, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200 (True), the process exits or time runs out (False)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


#: the experiment tag MLflow's UI reads a shared view (columns, sort, charts) from, and our key
SHARED_VIEW_TAG, SHARED_VIEW_KEY = "mlflow.sharedViewState.", "dmlbench"
#: tells MLflow 3 the experiment is model training, so its pages open in that mode, not GenAI's
#: (the UI of MLflow 3.17 ignores the tag: it takes the mode from the sidebar's toggle, which the
#: browser remembers, or from ``ML_MODE`` in the address, which every URL we print carries)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
ML_MODE = "workflowType=machine_learning"


def column(kind: str, name: str) -> str:
    """The UI's key of a runs-table column (``metrics.`test/recall_at_1```)."""
    return f"{kind}.`{name}`"


#: chart sections in the order a researcher reads them: results, then curves, then costs
SECTION_ORDER = ("test", "tuning", "best", "val", "epoch_test", "train", "params", "cost", "model")
#: sections logged once per epoch: line charts (the rest are one value per run: bars)
CURVE_SECTIONS = ("val", "epoch_test", "train")


def chart(key: str, section_id: str, curve: bool, hidden: bool, runs_shown: int) -> dict:
    """One chart card of the UI's chart view, in the shape its browser code builds them."""
    card = {
        "uuid": f"dmlbench-{key}",
        "type": "LINE" if curve else "BAR",
        "metricKey": key,
        "displayName": key.rsplit("/", 1)[-1],
        "metricSectionId": section_id,
        "deleted": hidden,
        "isGenerated": True,
        "runsCountToCompare": runs_shown,
    }
    if curve:
        card.update(
            {
                "lineSmoothness": 0,
                "xAxisScaleType": "linear",
                "scaleType": "linear",
                "range": {},
                "xAxisKey": "step",
                "selectedXAxisMetricKey": "",
                "yAxisKey": "metric",
                "yAxisExpressions": [],
                "ignoreOutliers": False,
                "useGlobalXaxisKey": True,
                "useGlobalLineSmoothing": True,
            }
        )
    return card


def view_state(runs: list[dict[str, float]]) -> dict:
    """The runs view a researcher wants on arrival, from the runs' latest metric values: the
    results as columns sorted by the study's objective (else test R@1); in the chart view every
    run drawn, results first, curves next, costs last, and no chart of a value every run shares
    (a single-seed study's zero std, a fixed parameter count). System metrics and anything else
    are left to the UI, which adds their charts after these."""
    metrics = set().union(*runs) if runs else set()
    parents = any(m.startswith("tuning/") for m in metrics)
    objective = next((m for m in sorted(metrics) if m.startswith("tuning/best_")), None)
    wanted = ([objective] if objective else []) + (
        [
            "test/recall_at_1_mean",
            "test/map_at_r_mean",
            "test/recall_at_1_std",
            "params/trainable",
            "params/trainable_inference",
            "cost/throughput_img_s",
        ]
        if parents
        else [
            "test/recall_at_1",
            "test/map_at_r",
            "best/val_recall_at_1",
            "best/val_map_at_r",
            "params/trainable",
            "cost/throughput_img_s",
        ]
    )
    order = objective or ("test/recall_at_1_mean" if parents else "test/recall_at_1")
    columns = [column("metrics", m) for m in wanted if m in metrics] + [column("tags", "dmlbench.method")]
    runs_shown = max(10, min(len(runs), 100))
    sections, charts = [], []
    for name in SECTION_ORDER:
        keys = sorted(m for m in metrics if m.split("/", 1)[0] == name and "/" in m)
        if not keys:
            continue
        section_id = f"dmlbench-section-{name}"
        sections.append(
            {
                "uuid": section_id,
                "name": name,
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": True,
            }
        )
        for key in keys:
            values = [run[key] for run in runs if key in run]  # latest values: curves never count as constant
            constant = name not in CURVE_SECTIONS and len(values) > 1 and len(set(values)) == 1
            charts.append(chart(key, section_id, name in CURVE_SECTIONS, constant, runs_shown))
    return {
        "selectedColumns": columns,
        "columnOrder": columns,
        "orderByKey": column("metrics", order),
        "orderByAsc": False,
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
        "compareRunSections": sections,
        "compareRunCharts": charts,
        "isAccordionReordered": True,
    }


def encode_view(state: dict) -> str:
    """The tag's value: JSON, deflated the way the UI's own "share" button does when it is too
    long for an experiment tag (a study's chart cards run to tens of kilobytes)."""
    import base64
    import json
    import zlib

    text = json.dumps(state, separators=(",", ":"))
    if len(text) <= 8000:
        return text
    return "deflate;" + base64.b64encode(zlib.compress(text.encode(), 9)).decode()


def decode_view(value: str) -> dict:
    """Inverse of :func:`encode_view` (for tests and ``dmlbench`` itself)."""
    import base64
    import json
    import zlib

    if value.startswith("deflate;"):
        value = zlib.decompress(base64.b64decode(value.removeprefix("deflate;"))).decode()
    return json.loads(value)


def share_view(uri: str, experiment_id: str) -> str:
    """Store the view on the experiment (tags the UI reads) and return its address."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = [run.data.metrics for run in client.search_runs([experiment_id], max_results=500)]
    client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + SHARED_VIEW_KEY, encode_view(view_state(runs)))
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={SHARED_VIEW_KEY}&{ML_MODE}"


def runs_view(uri: str) -> str:
    """The runs table of the most recently updated experiment, opened on :func:`view_state`."""
    import mlflow

    try:
        experiments = mlflow.MlflowClient(uri).search_experiments()
    except Exception:  # noqa: BLE001 - an empty or foreign store: the UI's home page
        return ""
    if not experiments:
        return ""
    latest = max(experiments, key=lambda e: (e.last_update_time or 0, e.experiment_id))
    try:
        return share_view(uri, latest.experiment_id)
    except Exception:  # noqa: BLE001 - a read-only store: the plain runs view
        return f"#/experiments/{latest.experiment_id}/runs"


def run_url(run_id: str, given_uri: str = "") -> str:
    """The run's page: on the tracking server, or via 'dmlbench ui' for a local store (with the
    store the user named, so the hint opens the store the run is in)."""
    import mlflow

    run = mlflow.get_run(run_id)
    uri = mlflow.get_tracking_uri()
    page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}?{ML_MODE}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    store = f" --tracking-uri {given_uri}" if given_uri else ""
    return f"start 'dmlbench ui{store}', then http://127.0.0.1:5000/{page}"
