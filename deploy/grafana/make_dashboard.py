#!/usr/bin/python3
"""Writes optd-dashboard.json beside this file: the Grafana dashboard for optd's metrics.

The JSON is generated so that forty-odd panels share one layout and one style; edit this file and
rerun it (/usr/bin/python3 deploy/grafana/make_dashboard.py) rather than editing the JSON.
tests/deploy/check_deploy.py fails when the committed JSON differs from what this writes.
"""

import json
import pathlib

OUTPUT = pathlib.Path(__file__).with_name("optd-dashboard.json")

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE = 'instance=~"$instance"'
SESSION = 'instance=~"$instance", session=~"$session"'
SESSION_AGGREGATE = SESSION + ', tensor=""'
TENSOR = SESSION + ', tensor=~"$tensor"'

WIDTH = 24  # Grafana's grid width


class Layout:
    """Places panels left to right, wrapping at the grid width; ids count up from 1."""

    def __init__(self):
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def take_id(self):
        self.next_id += 1
        return self.next_id - 1

    def place(self, w, h):
        if self.x + w > WIDTH:
            self.x = 0
            self.y += self.row_height
            self.row_height = 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def new_row(self):
        if self.x:
            self.y += self.row_height
        self.x = 0
        self.row_height = 0
        pos = {"h": 1, "w": WIDTH, "x": 0, "y": self.y}
        self.y += 1
        return pos


def target(expr, legend, ref):
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True,
            "refId": ref, "editorMode": "code"}


def panel(layout, title, description, queries, unit="short", w=8, h=8, log=False,
          threshold=None, stack=False, decimals=None, minimum=None):
    """A time series panel. queries: (expr, legend) pairs. threshold: a value drawn as a line."""
    steps = [{"color": "green", "value": None}]
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
              "showPoints": "never", "spanNulls": False,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"},
              "thresholdsStyle": {"mode": "off"}}
    if threshold is not None:
        steps.append({"color": "red", "value": threshold})
        custom["thresholdsStyle"] = {"mode": "line"}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    defaults = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"},
                "thresholds": {"mode": "absolute", "steps": steps}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "id": layout.take_id(),
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": layout.place(w, h),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(expr, legend, chr(ord("A") + i))
                    for i, (expr, legend) in enumerate(queries)],
    }


def row(layout, title, collapsed=False):
    return {"id": layout.take_id(), "type": "row", "title": title, "collapsed": collapsed,
            "gridPos": layout.new_row(), "panels": []}


def service_panels(layout):
    rate = "[$__rate_interval]"
    return [
        row(layout, "Service health"),
        panel(layout, "RPCs/s by method and code",
              "Completed gRPC calls per second, by method and gRPC status code name "
              "(optd_rpc_total). Codes other than OK are refused or failed calls; "
              "optd_rejected_total says why.",
              [(f"sum by (method, code) (rate(optd_rpc_total{{{INSTANCE}}}{rate}))",
                "{{method}} {{code}}")], unit="reqps"),
        panel(layout, "RPC error ratio by method",
              "Share of each method's calls that ended with a code other than OK (0 for a method "
              "without errors). "
              "Alert OptdRpcErrorRatioHigh fires above 5% for 10 minutes.",
              [(f'(sum by (method) (rate(optd_rpc_total{{{INSTANCE}, code!="OK"}}{rate})) or '
                f"sum by (method) (rate(optd_rpc_total{{{INSTANCE}}}{rate})) * 0) / "
                f"sum by (method) (rate(optd_rpc_total{{{INSTANCE}}}{rate}))", "{{method}}")],
              unit="percentunit", threshold=0.05, minimum=0),
        panel(layout, "Step latency p50 / p99 by optimizer",
              "One Step call from its header to the last result byte (optd_step_duration_seconds), "
              "per optimizer preset (the session's matrix presets joined by '+'). Quantiles "
              "interpolated within histogram buckets.",
              [(f"histogram_quantile(0.5, sum by (optimizer, le) "
                f"(rate(optd_step_duration_seconds_bucket{{{INSTANCE}}}{rate})))",
                "p50 {{optimizer}}"),
               (f"histogram_quantile(0.99, sum by (optimizer, le) "
                f"(rate(optd_step_duration_seconds_bucket{{{INSTANCE}}}{rate})))",
                "p99 {{optimizer}}")], unit="s"),
        panel(layout, "Step phases: mean seconds per step",
              "Where a step's time goes, stacked: receive (gradients in), aggregate (across "
              "workers), compute (the optimizer), send (parameters out). Mean of "
              "optd_step_phase_seconds over the interval.",
              [(f"sum by (phase) (rate(optd_step_phase_seconds_sum{{{INSTANCE}}}{rate})) / "
                f"sum by (phase) (rate(optd_step_phase_seconds_count{{{INSTANCE}}}{rate}))",
                "{{phase}}")], unit="s", stack=True),
        panel(layout, "Step phases p99",
              "99th percentile of each step phase (optd_step_phase_seconds): the tail a slow "
              "step comes from.",
              [(f"histogram_quantile(0.99, sum by (phase, le) "
                f"(rate(optd_step_phase_seconds_bucket{{{INSTANCE}}}{rate})))", "{{phase}}")],
              unit="s"),
        panel(layout, "Tensor payload bytes/s",
              "Tensor payload received (gradients, uploads) and sent (parameters) per second; "
              "message framing not included.",
              [(f"sum(rate(optd_bytes_received_total{{{INSTANCE}}}{rate}))", "received"),
               (f"sum(rate(optd_bytes_sent_total{{{INSTANCE}}}{rate}))", "sent")],
              unit="Bps"),
        panel(layout, "Sessions held",
              "Sessions each instance holds (optd_sessions).",
              [(f"optd_sessions{{{INSTANCE}}}", "{{instance}}")], decimals=0, minimum=0),
        panel(layout, "Backend memory",
              "Bytes the backend holds for sessions (parameters and optimizer state) and for "
              "the analyzer's snapshots (optd_backend_memory_bytes).",
              [(f"sum by (kind) (optd_backend_memory_bytes{{{INSTANCE}}})", "{{kind}}")],
              unit="bytes", stack=True),
        panel(layout, "Rejections/s by reason",
              "Refused requests per second by reason (optd_rejected_total): queue_full, "
              "draining, unauthenticated, permission_denied, not_found, invalid_argument, "
              "nonfinite, wrong_step, over_quota, straggler, cancelled, other.",
              [(f"sum by (reason) (rate(optd_rejected_total{{{INSTANCE}}}{rate}))",
                "{{reason}}")], unit="reqps"),
        panel(layout, "Non-finite gradient values",
              "NaN or Inf gradient values received per session in each interval "
              "(optd_nonfinite_gradients_total). optd refuses such a step; a rising line means "
              "the client's training has diverged. Alert OptdNonfiniteGradients.",
              [(f"sum by (session) (increase(optd_nonfinite_gradients_total{{{INSTANCE}}}"
                f"[$__rate_interval]))", "{{session}}")], decimals=0, minimum=0),
        panel(layout, "Session memory / quota",
              "Each session's bytes (optd_session_memory_bytes) over the per-session quota "
              "(optd_session_memory_limit_bytes, one per instance, matched on instance). Alert "
              "OptdSessionNearMemoryQuota fires above 90%.",
              [(f"optd_session_memory_bytes{{{SESSION}}} / on (job, instance) group_left () "
                f"optd_session_memory_limit_bytes{{{INSTANCE}}}", "{{session}}")],
              unit="percentunit", threshold=0.9, minimum=0),
        panel(layout, "Analysis duration p99 and skips",
              "One analysis of a session's tensors (optd_analysis_duration_seconds, p99) and "
              "analyses skipped per second because the analyzer was still busy "
              "(optd_analysis_skipped_total): skips mean the figures below lag the steps.",
              [(f"histogram_quantile(0.99, sum by (le) "
                f"(rate(optd_analysis_duration_seconds_bucket{{{INSTANCE}}}{rate})))",
                "analysis p99 (s)"),
               (f"sum by (reason) (rate(optd_analysis_skipped_total{{{INSTANCE}}}{rate}))",
                "skipped/s {{reason}}")]),
    ]


# The optimizer figures, each once per session (aggregate: mean over the session's matrix
# tensors, as seed 000 averages per-layer figures) and once per tensor.
# (title, description, [(metric, selector extra, legend suffix)], options)
FIGURES = [
    ("Dominance ratio r_min",
     "Seed 000: r_i = (VVᵀ)_ii / mean_{j≠i} |(VVᵀ)_ij| over the rows i of the momentum V; r_min "
     "is the smallest over the rows. Above 1 (the red line) VVᵀ is diagonally dominant and row "
     "normalization (RMNP) approximates Muon's orthogonalization; seed 000 finds the ratios rise "
     "above 1 early in training and stay there. Below 1 for long: off-diagonal interactions "
     "dominate and RMNP is ill-suited (alert OptdDominanceRatioBelowOne). May be +Inf.",
     [("optd_dominance_ratio", ', stat="min"', "r_min")], {"log": True, "threshold": 1}),
    ("Dominance ratio r_avg / r_max",
     "Seed 000: the mean and largest row dominance ratio r_i of VVᵀ over the momentum's rows "
     "(r_min is in the panel beside). Seed 000 reports all three growing with model width "
     "(Θ(d₁) at initialization). Red line: 1.",
     [("optd_dominance_ratio", ', stat="avg"', "r_avg"),
      ("optd_dominance_ratio", ', stat="max"', "r_max")], {"log": True, "threshold": 1}),
    ("RMNP–Muon cosine",
     "Cosine between the RMNP direction diag(VVᵀ)^(-1/2)·V and the exact polar factor of V "
     "(Muon's direction). Seed 000: when VVᵀ is diagonally dominant the two are asymptotically "
     "equal, so this is near 1.",
     [("optd_rmnp_muon_cosine", "", "")], {"minimum": 0}),
    ("Stable rank",
     "‖X‖F² / σ_max² of the momentum and of the update: how many directions carry the energy. "
     "An orthogonalized update (Muon) has a stable rank near min(m, n); seed 002 reports Muon "
     "flattening the update's spectrum.",
     [("optd_stable_rank", ', of="momentum"', "momentum"),
      ("optd_stable_rank", ', of="update"', "update")], {}),
    ("Condition number of the momentum",
     "σ_max / σ_min of the momentum V. Seed 003: normalized singular values shrink as "
     "1/sqrt(input dimension), and the smallest are the ones Newton–Schulz fails to bring to 1; "
     "a large condition number warns of that. May be +Inf (a rank-deficient V).",
     [("optd_condition_number", ', of="momentum"', "")], {"log": True}),
    ("Singular value entropy",
     "Entropy of σ/Σσ for the momentum and the update: higher means a flatter spectrum. The "
     "update's entropy near log(min(m, n)) means orthogonalization worked (seed 002's flat "
     "spectrum).",
     [("optd_singular_value_entropy", ', of="momentum"', "momentum"),
      ("optd_singular_value_entropy", ', of="update"', "update")], {}),
    ("Newton–Schulz polar error",
     "‖NS(V) − polar(V)‖F / ‖polar(V)‖F for the session's Newton–Schulz setting: how far "
     "Muon's iteration is from the exact orthogonalization (seed 003).",
     [("optd_newton_schulz_polar_error", "", "")], {"minimum": 0}),
    ("Newton–Schulz small-σ share",
     "Share of singular values of NS(V) below 0.6. Seed 003: at large widths the singular values "
     "of V shrink and a fixed number of Newton–Schulz steps leaves many of them small; more NS "
     "steps or dimension-dependent coefficients help. Red line: alert "
     "OptdNewtonSchulzSmallSingularValues's 10%.",
     [("optd_newton_schulz_small_sv_fraction", "", "")], {"unit": "percentunit", "threshold": 0.1,
                                                "minimum": 0}),
    ("Newton–Schulz steps chosen (ns.steps=auto)",
     "Seed 003, closed loop: with ns.steps=auto each matrix runs the fewest Newton–Schulz steps "
     "whose polynomial leaves at most ns.small_sv_target of its input's singular values below "
     "0.6, re-decided every auto.interval steps within [ns.min_steps, ns.max_steps]; the mean "
     "over the tensor's matrices that run Newton–Schulz (0 where all row-normalize). Rising "
     "steps mean the spectrum is spreading toward small "
     "values. Only sessions with an auto mode have this series.",
     [("optd_newton_schulz_steps", "", "")], {"minimum": 0}),
    ("Direction chosen (direction=auto)",
     "Seed 000, closed loop: the share of the tensor's matrices that row-normalize (RMNP) "
     "instead of running Newton–Schulz, chosen where V·Vᵀ's r_min ≥ auto.min_dominance and "
     "cos(rownormalize(V), polar(V)) ≥ auto.min_cosine. 0: Newton–Schulz everywhere, 1: row "
     "normalization everywhere. Only sessions with an auto mode have this series.",
     [("optd_direction", "", "")], {"unit": "percentunit", "minimum": 0}),
    ("Neuron norm CV of the update",
     "Coefficient of variation of the update's row (neuron) norms. Seed 002 (NorMuon): Muon's "
     "orthogonalized updates have highly non-uniform neuron norms, so some neurons take larger "
     "steps than others; NorMuon's row normalization brings this toward 0.",
     [("optd_neuron_norm_cv", ', of="update"', "")], {"minimum": 0}),
    ("Update RMS and gradient norm",
     "Root mean square of the update the optimizer applied, and the Frobenius norm of the "
     "gradient it received, as named.",
     [("optd_update_rms", "", "update RMS"), ("optd_grad_norm", "", "grad norm")],
     {"log": True}),
]


def figure_panels(layout, selector, legend_prefix, title_suffix=""):
    panels = []
    for title, description, series, options in FIGURES:
        title += title_suffix
        queries = []
        for metric, extra, suffix in series:
            legend = " ".join(part for part in (legend_prefix, suffix) if part)
            queries.append((f"{metric}{{{selector}{extra}}}", legend))
        panels.append(panel(layout, title, description, queries, **options))
    return panels


def session_panels(layout):
    panels = [row(layout, "Optimizer figures per session (mean over the session's tensors)")]
    panels.append(panel(
        layout, "Completed step and analysed step",
        "optd_session_step: the steps each session has completed. optd_analysis_step: the step "
        "the figures in this row belong to. A growing gap means the analyzer is skipping steps "
        "(see 'Analysis duration p99 and skips').",
        [(f"optd_session_step{{{SESSION}}}", "{{session}} completed"),
         (f"optd_analysis_step{{{SESSION}}}", "{{session}} analysed")], decimals=0))
    panels += figure_panels(layout, SESSION_AGGREGATE, "{{session}}")
    return panels


def tensor_panels(layout):
    tensor_row = row(layout, "Optimizer figures per tensor ($tensor)", collapsed=True)
    tensor_row["panels"] = figure_panels(layout, TENSOR, "{{session}} {{tensor}}",
                                         " per tensor")
    return [tensor_row]


def variable(name, label, query, multi=True, all_value=".+"):
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "definition": query, "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2, "sort": 1, "multi": multi, "includeAll": True, "allValue": all_value,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "hide": 0, "regex": "",
    }


def dashboard():
    layout = Layout()
    panels = service_panels(layout) + session_panels(layout) + tensor_panels(layout)
    return {
        "uid": "optd",
        "title": "optd",
        "description": "optd optimizer daemon: service health and the optimizer figures of "
                       "DESIGN.md 'Metrics' (seeds 000, 002, 003).",
        "tags": ["optd"],
        "schemaVersion": 38,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "includeAll": False,
             "multi": False, "options": [], "refresh": 1, "regex": ""},
            variable("instance", "Instance", 'label_values(up{job="optd"}, instance)',
                     all_value=".*"),
            variable("session", "Session",
                     'label_values(optd_session_step{instance=~"$instance"}, session)'),
            variable("tensor", "Tensor",
                     'label_values(optd_stable_rank{instance=~"$instance", session=~"$session", '
                     'tensor!=""}, tensor)'),
        ]},
        "panels": panels,
    }


def render():
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
