#!/usr/bin/python3
"""Checks optd's Prometheus and Grafana assets under deploy/.

  check_deploy.py --repo ROOT [--exposition FILE] [--promtool PATH]
  check_deploy.py --repo ROOT --self-test [--promtool PATH]

(a) promtool: `check config` on prometheus.yml, `check rules` on optd.rules.yml and
    optd.alerts.yml, `test rules` on optd.rules_test.yml.
(b) The dashboard JSON: required top-level keys, unique panel ids, a datasource, a description
    and at least one target with an expr on every panel, gridPos in the 24-column grid without
    overlaps, every $variable defined, and the file equal to what make_dashboard.py writes.
    The rules: every alert has `for`, a severity and summary/description annotations, and the
    unit-test file makes each alert fire once and stay quiet once.
(c) Every metric name a dashboard query, a template variable query, a rule or a rule-test series
    uses is either a recording rule of optd.rules.yml or a metric optd exports. The exported
    names come from a Prometheus text exposition (--exposition, e.g. `curl 127.0.0.1:9464/metrics`
    saved to a file; names from its `# TYPE` lines, histograms expanded to _bucket/_sum/_count),
    or, without it, from the contract in DESIGN.md "Metrics", listed below.

--self-test proves (c) works: it copies deploy/ to a temporary tree, misspells one metric name in
the dashboard and one in the alerts, and checks that the checker fails on each, naming it.

Exit status: 0 all checks passed; 1 a check failed; 77 every check that could run passed but
promtool was not found, so (a) was skipped (CTest: set SKIP_RETURN_CODE 77). Needs PyYAML
(Debian python3-yaml). Run with /usr/bin/python3.
"""

import argparse
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:
    sys.exit("check_deploy.py: PyYAML is missing (apt-get install python3-yaml; run with "
             "/usr/bin/python3)")

SKIPPED = 77

# The metric contract (DESIGN.md "Metrics"); used when no exposition file is given.
CONTRACT_METRICS = {
    "counter": [
        "optd_rpc_total", "optd_bytes_received_total", "optd_bytes_sent_total",
        "optd_rejected_total", "optd_nonfinite_gradients_total", "optd_analysis_skipped_total",
        "optd_checkpoint_failures_total",
    ],
    "gauge": [
        "optd_sessions", "optd_build_info", "optd_backend_memory_bytes", "optd_session_memory_bytes",
        "optd_session_memory_limit_bytes", "optd_session_step", "optd_analysis_step",
        "optd_dominance_ratio", "optd_rmnp_muon_cosine", "optd_stable_rank",
        "optd_condition_number", "optd_singular_value_entropy", "optd_newton_schulz_polar_error",
        "optd_newton_schulz_small_sv_fraction", "optd_neuron_norm_cv", "optd_update_rms", "optd_grad_norm",
        "optd_newton_schulz_steps", "optd_direction",
    ],
    "histogram": [
        "optd_step_duration_seconds", "optd_step_phase_seconds", "optd_analysis_duration_seconds",
    ],
}

# Series Prometheus itself attaches to every scrape target.
SCRAPE_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                  "scrape_samples_post_metric_relabeling", "scrape_series_added"}

# PromQL functions (Prometheus 2.42), aggregation operators and keywords.
FUNCTIONS = set("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
deg delta deriv exp floor histogram_count histogram_fraction histogram_quantile histogram_sum
holt_winters hour idelta increase irate label_join label_replace last_over_time ln log10 log2
max_over_time min_over_time minute month pi predict_linear present_over_time quantile_over_time
rad rate resets round scalar sgn sin sinh sort sort_desc sqrt stddev_over_time stdvar_over_time
sum_over_time tan tanh time timestamp vector year start end
""".split())
AGGREGATIONS = set("sum min max avg group stddev stdvar count count_values bottomk topk "
                   "quantile".split())
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z_][A-Za-z0-9_]*\]\])
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:(?:ms|[smhdwy])\d*)*)
  | (?P<identifier>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
""", re.VERBOSE)

# A Grafana template variable reference: $name, ${name}, ${name:format}, [[name]].
VARIABLE_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
                          r"|\[\[([A-Za-z_][A-Za-z0-9_]*)\]\]")


class PromQLError(ValueError):
    pass


def tokenize(expr):
    tokens, pos = [], 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if not match:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        if match.lastgroup not in ("space", "comment"):
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


def skip_group(tokens, i, open_, close, expr):
    """Index just past the group that opens at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j] == ("punct", open_):
            depth += 1
        elif tokens[j] == ("punct", close):
            depth -= 1
            if depth == 0:
                return j + 1
    raise PromQLError(f"unbalanced {open_!r} in {expr!r}")


def metric_names(expr):
    """The metric names a PromQL expression selects: identifiers outside strings, label matchers,
    range brackets and grouping label lists that are not functions or keywords, plus the value of
    any __name__="..." matcher. Raises PromQLError on an unknown function."""
    tokens = tokenize(expr)
    names = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if (kind, text) == ("punct", "{"):
            end = skip_group(tokens, i, "{", "}", expr)
            inner = tokens[i + 1:end - 1]
            for k in range(len(inner) - 2):
                if inner[k] == ("identifier", "__name__") and inner[k + 1] == ("punct", "=") \
                        and inner[k + 2][0] == "string":
                    names.append(inner[k + 2][1][1:-1])
            i = end
        elif (kind, text) == ("punct", "["):
            i = skip_group(tokens, i, "[", "]", expr)
        elif kind == "identifier":
            word = text.lower()
            if word in GROUPING:
                i += 1
                if following == ("punct", "("):
                    i = skip_group(tokens, i, "(", ")", expr)
            elif word in KEYWORDS:
                i += 1
            elif following == ("punct", "("):
                if word not in FUNCTIONS and word not in AGGREGATIONS:
                    raise PromQLError(f"unknown function {text!r} in {expr!r}")
                i += 1
            elif word in AGGREGATIONS and following and following[1].lower() in GROUPING:
                i += 1  # sum by (x) (...)
            else:
                names.append(text)
                i += 1
        else:
            i += 1
    return names


def exported_from_exposition(text):
    names = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[:2] == ["#", "TYPE"]:
            name, kind = fields[2], fields[3]
            names.add(name)
            if kind in ("histogram", "gaugehistogram"):
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
            elif kind == "summary":
                names.update(name + s for s in ("_sum", "_count"))
            elif kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")  # OpenMetrics names the family without _total
    return names


def contract_metrics():
    names = set(CONTRACT_METRICS["counter"]) | set(CONTRACT_METRICS["gauge"])
    for name in CONTRACT_METRICS["histogram"]:
        names.update(name + s for s in ("_bucket", "_sum", "_count"))
    return names


class Report:
    def __init__(self, quiet=False):
        self.errors = []
        self.quiet = quiet

    def section(self, message):
        if not self.quiet:
            print(message)

    def ok(self, message):
        if not self.quiet:
            print(f"  ok   {message}")

    def fail(self, message):
        self.errors.append(message)
        if not self.quiet:
            print(f"  FAIL {message}")

    def check(self, condition, message):
        (self.ok if condition else self.fail)(message)
        return condition


class Paths:
    def __init__(self, repo):
        self.repo = repo
        self.prometheus = repo / "deploy" / "prometheus"
        self.config = self.prometheus / "prometheus.yml"
        self.rules = self.prometheus / "optd.rules.yml"
        self.alerts = self.prometheus / "optd.alerts.yml"
        self.rules_test = self.prometheus / "optd.rules_test.yml"
        self.dashboard = repo / "deploy" / "grafana" / "optd-dashboard.json"
        self.dashboard_generator = repo / "deploy" / "grafana" / "make_dashboard.py"


# (a) promtool

INTERVALS = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|"
                       r"__interval|__range)\}")


def dashboard_as_rules(dashboard):
    """The dashboard's queries as recording rules, so `promtool check rules` parses them:
    interval variables become 5m, other variables the regex .* (they only appear in =~)."""
    rules = []
    for panel in walk_panels(dashboard.get("panels", [])):
        for t in panel.get("targets", []):
            expr = VARIABLE_REF.sub(".*", INTERVALS.sub("5m", t.get("expr", "")))
            rules.append({"record": f"dashboard:panel_{panel.get('id')}:{t.get('refId')}",
                          "expr": expr})
    return {"groups": [{"name": "dashboard", "rules": rules}]}


def check_promtool(paths, promtool, report):
    report.section("(a) promtool")
    commands = [
        [promtool, "check", "config", str(paths.config)],
        [promtool, "check", "rules", str(paths.rules), str(paths.alerts)],
        [promtool, "test", "rules", str(paths.rules_test)],
    ]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            dashboard = json.loads(paths.dashboard.read_text(encoding="utf-8"))
            queries = pathlib.Path(tmp) / "dashboard_queries.rules.yml"
            queries.write_text(yaml.safe_dump(dashboard_as_rules(dashboard)), encoding="utf-8")
            commands.append([promtool, "check", "rules", str(queries)])
        except (OSError, ValueError) as error:
            report.fail(f"cannot read the dashboard's queries: {error}")
        run_promtool(paths, commands, report)


def run_promtool(paths, commands, report):
    for command in commands:
        shown = " ".join(["promtool"] + [str(pathlib.Path(a).relative_to(paths.repo))
                                         if a.startswith(str(paths.repo)) else a
                                         for a in command[1:]])
        if command[-1].endswith("dashboard_queries.rules.yml"):
            shown = "promtool check rules <the dashboard's queries, variables substituted>"
        result = subprocess.run(command, capture_output=True, text=True)
        output = (result.stdout + result.stderr).strip()
        if result.returncode == 0:
            report.ok(f"{shown}: " + " | ".join(line.strip() for line in output.splitlines()
                                                 if "SUCCESS" in line))
        else:
            report.fail(f"{shown} exited {result.returncode}:\n{output}")


# (b) structure

def walk_panels(panels):
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def overlapping(panels):
    boxes = [(p["id"], p["gridPos"]) for p in panels if isinstance(p.get("gridPos"), dict)]
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            (ida, pa), (idb, pb) = boxes[a], boxes[b]
            if (pa["x"] < pb["x"] + pb["w"] and pb["x"] < pa["x"] + pa["w"]
                    and pa["y"] < pb["y"] + pb["h"] and pb["y"] < pa["y"] + pa["h"]):
                yield ida, idb


def variable_refs(text):
    return {next(g for g in m.groups() if g) for m in VARIABLE_REF.finditer(text)}


def variable_query(variable):
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def check_dashboard(paths, report):
    report.section(f"(b) dashboard {paths.dashboard.relative_to(paths.repo)}")
    try:
        text = paths.dashboard.read_text(encoding="utf-8")
        dashboard = json.loads(text)
    except (OSError, ValueError) as error:
        report.fail(f"cannot read the dashboard: {error}")
        return None
    report.ok("valid JSON")

    missing = [k for k in ("uid", "title", "panels", "templating", "schemaVersion", "time",
                           "annotations") if k not in dashboard]
    report.check(not missing, "top-level keys uid, title, panels, templating, schemaVersion, "
                 "time, annotations" + (f" (missing: {missing})" if missing else ""))
    report.check(dashboard.get("title") == "optd" and dashboard.get("uid"),
                 f"title {dashboard.get('title')!r}, uid {dashboard.get('uid')!r}")
    schema = dashboard.get("schemaVersion")
    report.check(isinstance(schema, int) and 36 <= schema <= 41, f"schemaVersion {schema}")

    variables = dashboard.get("templating", {}).get("list", [])
    names = [v.get("name") for v in variables]
    report.check(len(names) == len(set(names)), f"template variables {names} are unique")
    defined = set()
    # ${DS_...} inputs of a dashboard exported for sharing count as defined too.
    defined.update(i.get("name") for i in dashboard.get("__inputs", []))
    for variable in variables:
        name, kind = variable.get("name"), variable.get("type")
        if kind == "datasource":
            report.check(variable.get("query") == "prometheus",
                         f"variable {name}: datasource variable of type prometheus")
        elif kind == "query":
            query = variable_query(variable)
            undefined = {r for r in variable_refs(query) if not r.startswith("__")} - defined
            report.check(query and variable.get("datasource") and not undefined,
                         f"variable {name}: query {query!r}"
                         + (f" uses undefined {sorted(undefined)}" if undefined else ""))
        defined.add(name)
    for wanted in ("session", "tensor"):
        report.check(wanted in defined, f"variable {wanted} defined")
    session = next((v for v in variables if v.get("name") == "session"), {})
    report.check(re.match(r"label_values\(optd_session_step\b.*,\s*session\)$",
                          variable_query(session)),
                 "variable session lists label_values(optd_session_step, session)")

    panels = list(walk_panels(dashboard.get("panels", [])))
    ids = [p.get("id") for p in panels]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    report.check(all(isinstance(i, int) for i in ids) and not duplicates,
                 f"{len(panels)} panel ids unique integers"
                 + (f" (duplicates: {duplicates})" if duplicates else ""))

    bad_grid = [p.get("id") for p in panels
                if not (isinstance(p.get("gridPos"), dict)
                        and all(isinstance(p["gridPos"].get(k), int) for k in "hwxy")
                        and p["gridPos"]["w"] > 0 and p["gridPos"]["h"] > 0
                        and p["gridPos"]["x"] >= 0
                        and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24)]
    report.check(not bad_grid, "every panel has a gridPos inside the 24-column grid"
                 + (f" (not: {bad_grid})" if bad_grid else ""))
    if not bad_grid:
        clashes = list(overlapping(dashboard.get("panels", [])))
        for row in dashboard.get("panels", []):
            if row.get("type") == "row":
                clashes += overlapping(row.get("panels", []))
        report.check(not clashes, "no two panels overlap" + (f" ({clashes})" if clashes else ""))

    expanded_rows = [p["id"] for p in dashboard.get("panels", [])
                     if p.get("type") == "row" and not p.get("collapsed") and p.get("panels")]
    report.check(not expanded_rows, "only collapsed rows hold panels")

    problems, undefined = [], set()
    graphs = [p for p in panels if p.get("type") != "row"]
    for panel in graphs:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if not panel.get("description"):
            problems.append(f"{where}: no description")
        datasources = [panel.get("datasource")] + [t.get("datasource") for t in
                                                   panel.get("targets", []) if "datasource" in t]
        if not panel.get("datasource"):
            problems.append(f"{where}: no datasource")
        targets = panel.get("targets") or []
        if not targets or not all(isinstance(t.get("expr"), str) and t["expr"].strip()
                                  for t in targets):
            problems.append(f"{where}: needs at least one target, each with an expr")
        strings = [json.dumps(d) for d in datasources if d] + [panel.get("title", "")]
        strings += [t.get("expr", "") for t in targets]
        strings += [t.get("legendFormat", "") for t in targets]
        for string in strings:
            undefined |= {r for r in variable_refs(string) if not r.startswith("__")} - defined
    for problem in problems:
        report.fail(problem)
    report.check(not problems, f"{len(graphs)} panels: each has a description, a datasource and "
                 "targets with an expr")
    report.check(not undefined, "every $variable in panels and targets is defined"
                 + (f" (undefined: {sorted(undefined)})" if undefined else ""))

    if paths.dashboard_generator.exists():
        spec = importlib.util.spec_from_file_location("make_dashboard", paths.dashboard_generator)
        generator = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generator)
        report.check(generator.render() == text,
                     "the JSON is what deploy/grafana/make_dashboard.py writes (rerun it after "
                     "editing)")
    return dashboard


def load_yaml(path, report):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        report.fail(f"cannot read {path}: {error}")
        return None


def rules_of(document):
    for group in (document or {}).get("groups", []):
        yield from group.get("rules", [])


def check_rule_structure(paths, report):
    report.section("(b) rules")
    alerts = list(rules_of(load_yaml(paths.alerts, report)))
    recordings = list(rules_of(load_yaml(paths.rules, report)))
    tests = load_yaml(paths.rules_test, report) or {}
    names = [r.get("record") for r in recordings]
    bad_names = [n for n in names if not re.fullmatch(r"optd:[a-z0-9_]+:[a-z0-9_]+", n or "")]
    report.check(recordings and not bad_names, f"{len(names)} recording rules named "
                 "optd:metric:operations" + (f" (not: {bad_names})" if bad_names else ""))
    fired, quiet, tested_records = set(), set(), set()
    for case in tests.get("tests", []):
        for test in case.get("alert_rule_test", []):
            (fired if test.get("exp_alerts") else quiet).add(test.get("alertname"))
        for test in case.get("promql_expr_test", []):
            tested_records.update(n for n in names if n in test.get("expr", ""))
    for alert in alerts:
        name = alert.get("alert")
        annotations = alert.get("annotations", {})
        report.check("for" in alert and alert.get("labels", {}).get("severity") in
                     ("critical", "warning", "info")
                     and annotations.get("summary") and annotations.get("description"),
                     f"alert {name}: for {alert.get('for')}, severity "
                     f"{alert.get('labels', {}).get('severity')}, summary and description")
        report.check(name in fired and name in quiet,
                     f"alert {name}: the rule tests see it fire and stay quiet")
    report.check(len(tested_records) >= 2, f"recording rules with expected values in the rule "
                 f"tests: {sorted(tested_records)}")
    return alerts, recordings, tests


# (c) metric names

def series_name(selector):
    match = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", selector)
    return match.group(1) if match else None


def check_metric_names(paths, dashboard, alerts, recordings, tests, exported, source, report):
    report.section(f"(c) metric names, against {source} ({len(exported)} names)")
    recorded = {r["record"]: r for r in recordings if "record" in r}
    uses = []  # (where, expr)
    for variable in (dashboard or {}).get("templating", {}).get("list", []):
        query = variable_query(variable)
        if variable.get("type") == "query":
            match = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
            inner = match.group(1) if match else re.sub(r"^\s*query_result\((.*)\)\s*$", r"\1",
                                                        query)
            uses.append((f"dashboard variable {variable.get('name')}", inner))
    for panel in walk_panels((dashboard or {}).get("panels", [])):
        for t in panel.get("targets", []):
            uses.append((f"dashboard panel {panel.get('id')} {panel.get('title')!r}",
                         t.get("expr", "")))
    for rule in recordings:
        uses.append((f"{paths.rules.name} record {rule.get('record')}", rule.get("expr", "")))
    for rule in alerts:
        uses.append((f"{paths.alerts.name} alert {rule.get('alert')}", rule.get("expr", "")))
    for case in tests.get("tests", []):
        for series in case.get("input_series", []):
            uses.append((f"{paths.rules_test.name} input series", series.get("series", "")))
        for test in case.get("promql_expr_test", []):
            uses.append((f"{paths.rules_test.name} expr", test.get("expr", "")))

    raw, via_rules, unknown = set(), {}, []
    for where, expr in uses:
        try:
            names = metric_names(expr)
        except PromQLError as error:
            report.fail(f"{where}: {error}")
            continue
        if not names:
            report.fail(f"{where}: names no metric: {expr!r}")
        for name in names:
            if name in recorded:
                via_rules.setdefault(name, set()).add(where)
            elif name in exported or name in SCRAPE_METRICS:
                raw.add(name)
            else:
                unknown.append((where, name))
    for where, name in unknown:
        report.fail(f"{where}: metric {name!r} is not exported by optd"
                    + (" and is no recording rule" if ":" in name else "")
                    + f" (checked against {source})")
    for name in sorted(via_rules):
        report.ok(f"{name} <- recording rule in {paths.rules.name} "
                  f"(used in {len(via_rules[name])} expression(s))")
    if unknown:
        report.fail(f"names not exported: {', '.join(sorted({n for _, n in unknown}))}")
    else:
        report.ok(f"{len(uses)} expressions name {len(raw)} raw metrics, all exported: "
                  + ", ".join(sorted(raw)))
    unused = sorted(name for name in set(exported) - raw - SCRAPE_METRICS
                    if name + "_bucket" not in exported)  # a histogram's own name is no series
    if unused:
        report.section(f"  note exported but not queried: {', '.join(unused)}")


def run_checks(repo, exposition, promtool, quiet=False):
    """Runs (a) to (c); returns (errors, promtool_skipped)."""
    report = Report(quiet)
    paths = Paths(repo)
    if exposition:
        try:
            text = pathlib.Path(exposition).read_text(encoding="utf-8")
        except OSError as error:
            return [f"--exposition: {error}"], False
        exported = exported_from_exposition(text)
        if not exported:
            return [f"--exposition {exposition}: no `# TYPE` lines"], False
        source = f"the exposition {exposition}"
    else:
        exported = contract_metrics()
        source = "the contract list in check_deploy.py (DESIGN.md 'Metrics')"
    skipped = promtool is None
    if skipped:
        report.section("(a) promtool not found: promtool checks SKIPPED")
    else:
        check_promtool(paths, promtool, report)
    dashboard = check_dashboard(paths, report)
    alerts, recordings, tests = check_rule_structure(paths, report)
    check_metric_names(paths, dashboard, alerts, recordings, tests, exported, source, report)
    return report.errors, skipped


# --self-test

def self_test(repo, promtool):
    failures = []

    def expect(condition, message):
        print(f"  {'ok  ' if condition else 'FAIL'} {message}")
        if not condition:
            failures.append(message)

    print("tokenizer")
    cases = {
        'sum by (method, code) (rate(optd_rpc_total{code!="OK", method=~"Step|x"}[5m]))':
            ["optd_rpc_total"],
        "a / on (job, instance) group_left () (b > 0)": ["a", "b"],
        'histogram_quantile(0.99, sum without (pod) (rate(x_bucket[$__rate_interval])))':
            ["x_bucket"],
        'optd:rpc:rate5m{code!="OK"} or absent(up{job="optd"}) offset 5m': ["optd:rpc:rate5m",
                                                                           "up"],
        'max_over_time(y[30m:1m]) > bool 1e3 and z @ end()': ["y", "z"],
        '{__name__="via_name", session=~"$session"} * Inf': ["via_name"],
        'count_values("value", w) by (le)': ["w"],
    }
    for expr, want in cases.items():
        got = metric_names(expr)
        expect(got == want, f"{expr!r} -> {got}")
    try:
        metric_names("rat(optd_rpc_total[5m])")
        expect(False, "a misspelled function is refused")
    except PromQLError as error:
        expect(True, f"a misspelled function is refused: {error}")

    exposition = ("# HELP optd_step_duration_seconds x\n# TYPE optd_step_duration_seconds "
                  "histogram\noptd_step_duration_seconds_bucket{le=\"1\"} 0\n"
                  "# TYPE optd_sessions gauge\noptd_sessions 1\n# TYPE optd_rpc counter\n")
    got = exported_from_exposition(exposition)
    expect(got == {"optd_step_duration_seconds", "optd_step_duration_seconds_bucket",
                   "optd_step_duration_seconds_sum", "optd_step_duration_seconds_count",
                   "optd_sessions", "optd_rpc", "optd_rpc_total"},
           f"exposition TYPE lines -> {sorted(got)}")

    script = pathlib.Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp)
        shutil.copytree(repo / "deploy", copy / "deploy")
        command = [sys.executable, str(script), "--repo", str(copy)]
        if promtool:
            command += ["--promtool", promtool]
        print(f"the assets copied to {copy}")
        result = subprocess.run(command, capture_output=True, text=True)
        expect(result.returncode == (0 if promtool else SKIPPED),
               f"unchanged: exit {result.returncode}, "
               + (result.stdout.strip().splitlines() or ["no output"])[-1])

        mutations = [
            (copy / "deploy" / "grafana" / "optd-dashboard.json", "optd_dominance_ratio{",
             "optd_dominance_ration{", "optd_dominance_ration"),
            (copy / "deploy" / "prometheus" / "optd.alerts.yml", "optd_analysis_step >= 100",
             "optd_analysis_steps >= 100", "optd_analysis_steps"),
            (copy / "deploy" / "prometheus" / "optd.alerts.yml", "optd:rpc_errors:ratio_rate5m >",
             "optd:rpc_error:ratio_rate5m >", "optd:rpc_error:ratio_rate5m"),
        ]
        for path, old, new, bad in mutations:
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(old, new, 1), encoding="utf-8")
            result = subprocess.run(command, capture_output=True, text=True)
            output = result.stdout + result.stderr
            caught = [line.strip() for line in output.splitlines()
                      if f"metric {bad!r} is not exported" in line]
            expect(result.returncode == 1 and caught,
                   f"{bad!r} in a copy of {path.name}: exit {result.returncode}, "
                   + (caught[0] if caught else "NOT caught"))
            path.write_text(original, encoding="utf-8")

        print("an exposition that lacks a metric the assets use")
        partial = "".join(f"# TYPE {name} {kind}\n" for kind, names in CONTRACT_METRICS.items()
                          for name in names if name != "optd_newton_schulz_small_sv_fraction")
        (copy / "partial.prom").write_text(partial, encoding="utf-8")
        errors, _ = run_checks(copy, copy / "partial.prom", None, quiet=True)
        caught = [e for e in errors if "'optd_newton_schulz_small_sv_fraction' is not exported" in e]
        others = [e for e in errors if "optd_newton_schulz_small_sv_fraction" not in e]
        expect(caught and not others,
               f"is caught: {len(caught)} uses of optd_newton_schulz_small_sv_fraction reported"
               + (f"; other problems: {others}" if others else ""))
    return failures


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 pass, 1 fail, 77 passed but promtool missing (skipped).")
    parser.add_argument("--repo", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[2],
                        help="the optd source tree (default: this script's)")
    parser.add_argument("--exposition", metavar="FILE",
                        help="a Prometheus text exposition of optd's /metrics: the exported "
                             "metric names (default: the contract list in this script)")
    parser.add_argument("--promtool", metavar="PATH", help="promtool (default: from PATH)")
    parser.add_argument("--self-test", action="store_true",
                        help="prove the metric-name check catches misspelled names, then exit")
    args = parser.parse_args()
    repo = args.repo.resolve()
    promtool = args.promtool or shutil.which("promtool")
    if args.promtool and not pathlib.Path(args.promtool).is_file():
        sys.exit(f"check_deploy.py: --promtool {args.promtool}: no such file")

    if args.self_test:
        failures = self_test(repo, promtool)
        print(f"self-test: {'FAILED' if failures else 'passed'}")
        return 1 if failures else 0

    errors, skipped = run_checks(repo, args.exposition, promtool)
    if errors:
        print(f"check_deploy: FAILED, {len(errors)} problem(s):")
        for error in errors:
            print(f"  - {error}")
        return 1
    if skipped:
        print("check_deploy: passed, but promtool was not found: (a) SKIPPED")
        return SKIPPED
    print("check_deploy: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
