"""A real Prometheus scrapes a running optd.

The test starts optd (built binary in $OPTD) on loopback, creates a session through optctl
($OPTCTL), steps it once with gradients made here, and starts Debian's `prometheus` with a
generated config that scrapes the daemon and loads deploy/prometheus's rules. It then checks:

- `promtool check metrics` accepts the exposition (but for its lint of two contract names), and
  tests/deploy/check_deploy.py finds every metric the dashboard and rules name in it;
- Prometheus' query API returns each optimizer figure per tensor and per session with the value
  numpy computes here in fp64 from the same gradients and the parameters the step returned;
- service series (RPCs, rejections, non-finite gradients, memory) carry what the test did;
- every recording and alerting rule evaluates without error on the real series.

Run: OPTD=build/server/optd OPTCTL=build/client/optctl /usr/bin/python3 -m pytest tests/deploy
"""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OPTD = os.environ.get("OPTD", os.path.join(REPO, "build/server/optd"))
OPTCTL = os.environ.get("OPTCTL", os.path.join(REPO, "build/client/optctl"))
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
sys.path.insert(0, os.path.join(REPO, "tests/python"))
from numpy_reference import newton_schulz  # noqa: E402

SHAPES = {"a": (8, 12), "b": (6, 10)}

CONFIG = """
tensors { name: "a" shape: [8, 12] group: "matrices" }
tensors { name: "b" shape: [6, 10] group: "matrices" }
tensors { name: "bias" shape: [12] group: "vectors" }
groups { name: "matrices" preset: "moonlight" overrides { key: "ns.dtype" value: "fp32" } }
groups { name: "vectors" preset: "adamw" }
analysis_interval: 1
"""

AUTO_CONFIG = """
tensors { name: "d" shape: [6, 6] group: "matrices" }
tensors { name: "e" shape: [6, 6] group: "matrices" }
groups { name: "matrices" preset: "keller"
         overrides { key: "ns.steps" value: "auto" } overrides { key: "direction" value: "auto" } }
"""

# Ones with 1.5 on the diagonal: r_i = 7.25/7 < 1.05, so it keeps Newton–Schulz.
AUTO_E = np.ones((6, 6)) + 0.5 * np.eye(6)

pytestmark = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                reason="Debian's prometheus package is not installed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_file(path, process, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and open(path).read().strip():
            return open(path).read().strip()
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not write {path}")


def http_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def optctl(server, *args, token=None, check=True):
    command = [OPTCTL, f"--server={server}"]
    if token:
        command.append(f"--token={token}")
    run = subprocess.run(command + list(args), capture_output=True, text=True, timeout=60)
    if check and run.returncode != 0:
        raise AssertionError(f"optctl {args} failed: {run.stderr}")
    return run


def save_npy(directory, tensors):
    os.makedirs(directory, exist_ok=True)
    for name, values in tensors.items():
        np.save(os.path.join(directory, f"{name}.npy"), values.astype(np.float32))


# --- fp64 reference figures (DESIGN.md, "Metrics"), independent of the daemon ---------------

def spectrum(s):
    p = s / s.sum()
    p = p[p > 0]
    return {"stable_rank": (s ** 2).sum() / s[0] ** 2,
            "condition": s[0] / s[-1] if s[-1] > 0 else np.inf,
            "entropy": float(-(p * np.log(p)).sum())}


def reference_figures(v, update, gradient):
    v, update = v.astype(np.float64), update.astype(np.float64)
    m = v.shape[0]
    gram = v @ v.T
    off = np.abs(gram).sum(axis=1) - np.abs(np.diag(gram))
    r = np.diag(gram) / (off / (m - 1))
    u, s, wt = np.linalg.svd(v, full_matrices=False)
    keep = s > max(v.shape) * np.finfo(np.float32).eps * s[0]
    polar = u[:, keep] @ wt[keep]
    rows = v / np.linalg.norm(v, axis=1, keepdims=True)
    ns = newton_schulz(v)
    ns_s = np.linalg.svd(ns, compute_uv=False)
    momentum, upd = spectrum(s), spectrum(np.linalg.svd(update, compute_uv=False))
    row_norms = np.linalg.norm(update, axis=1)
    return {
        ("optd_dominance_ratio", "stat", "min"): r.min(),
        ("optd_dominance_ratio", "stat", "avg"): r.mean(),
        ("optd_dominance_ratio", "stat", "max"): r.max(),
        ("optd_rmnp_muon_cosine", None, None):
            (rows * polar).sum() / (np.linalg.norm(rows) * np.linalg.norm(polar)),
        ("optd_stable_rank", "of", "momentum"): momentum["stable_rank"],
        ("optd_stable_rank", "of", "update"): upd["stable_rank"],
        ("optd_condition_number", "of", "momentum"): momentum["condition"],
        ("optd_singular_value_entropy", "of", "momentum"): momentum["entropy"],
        ("optd_singular_value_entropy", "of", "update"): upd["entropy"],
        ("optd_newton_schulz_polar_error", None, None):
            np.linalg.norm(ns - polar) / np.linalg.norm(polar),
        ("optd_newton_schulz_small_sv_fraction", None, None): float((ns_s < 0.6).mean()),
        ("optd_neuron_norm_cv", "of", "update"): row_norms.std() / row_norms.mean(),
        ("optd_update_rms", None, None): np.sqrt((update ** 2).mean()),
        ("optd_grad_norm", None, None): np.linalg.norm(gradient.astype(np.float64)),
    }


# --- the daemon and Prometheus ------------------------------------------------------------

@pytest.fixture(scope="module")
def stack():
    work = tempfile.mkdtemp(prefix="optd_prometheus_")
    optd = subprocess.Popen(
        [OPTD, "--listen=127.0.0.1:0", f"--port_file={work}/port", "--metrics_addr=127.0.0.1:0",
         f"--metrics_port_file={work}/metrics_port", "--threads=1"],
        stderr=open(f"{work}/optd.log", "w"))
    try:
        server = f"127.0.0.1:{wait_for_file(f'{work}/port', optd, 'optd')}"
        metrics_port = int(wait_for_file(f"{work}/metrics_port", optd, "optd"))
        state = drive(server, work)
        state.update(work=work, server=server, metrics_port=metrics_port, optd=optd)
        exposition = wait_for_analysis(metrics_port)
        with open(f"{work}/exposition.txt", "w") as f:
            f.write(exposition)
        prometheus, web = start_prometheus(work, metrics_port)
        state.update(prometheus=prometheus, web=web)
        yield state
    finally:
        if "prometheus" in locals():
            prometheus.terminate()
            prometheus.wait(timeout=30)
        optd.send_signal(signal.SIGTERM)
        assert optd.wait(timeout=60) == 0, open(f"{work}/optd.log").read()
        shutil.rmtree(work, ignore_errors=True)


def drive(server, work):
    """One good step, a wrong step number and a gradient with NaNs."""
    with open(f"{work}/session.textproto", "w") as f:
        f.write(CONFIG)
    created = optctl(server, "create", f"{work}/session.textproto", "--id=it").stdout
    token = dict(line.split(": ", 1) for line in created.splitlines() if ": " in line)["token"]
    rng = np.random.default_rng(5)
    gradients = {name: rng.standard_normal(shape).astype(np.float32)
                 for name, shape in SHAPES.items()}
    gradients["bias"] = rng.standard_normal(12).astype(np.float32)
    save_npy(f"{work}/grads", gradients)
    optctl(server, "step", "it", "--step=1", f"--grads={work}/grads", f"--out={work}/out",
           token=token)
    wrong = optctl(server, "step", "it", "--step=5", f"--grads={work}/grads", token=token,
                   check=False)
    assert wrong.returncode != 0 and "FAILED_PRECONDITION" in wrong.stderr, wrong.stderr
    bad = dict(gradients)
    bad["a"] = gradients["a"].copy()
    bad["a"][0, :3] = np.nan
    save_npy(f"{work}/bad", bad)
    nan = optctl(server, "step", "it", "--step=2", f"--grads={work}/bad", token=token,
                 check=False)
    assert nan.returncode != 0 and "INVALID_ARGUMENT" in nan.stderr, nan.stderr
    # A session whose matrix chooses its Newton–Schulz steps and direction (ns.steps=auto,
    # direction=auto): diag(1..6), whose rows are orthogonal, so row normalization is its polar
    # factor and is chosen.
    with open(f"{work}/auto.textproto", "w") as f:
        f.write(AUTO_CONFIG)
    created = optctl(server, "create", f"{work}/auto.textproto", "--id=auto").stdout
    auto_token = dict(line.split(": ", 1) for line in created.splitlines() if ": " in line)["token"]
    save_npy(f"{work}/auto_grads", {"d": np.diag(np.arange(1.0, 7.0)), "e": AUTO_E})
    optctl(server, "step", "auto", "--step=1", f"--grads={work}/auto_grads", token=auto_token)
    return {"token": token, "gradients": gradients}


def wait_for_analysis(metrics_port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        if 'optd_analysis_step{session="it"} 1' in text:
            return text
        time.sleep(0.1)
    raise TimeoutError("no analysis of step 1 appeared in /metrics")


def start_prometheus(work, metrics_port):
    web = f"127.0.0.1:{free_port()}"
    rules = os.path.join(REPO, "deploy/prometheus")
    with open(f"{work}/prometheus.yml", "w") as f:
        f.write(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}/optd.rules.yml
  - {rules}/optd.alerts.yml
scrape_configs:
  - job_name: optd
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work}/prometheus.yml", f"--storage.tsdb.path={work}/tsdb",
         f"--web.listen-address={web}"],
        stdout=subprocess.DEVNULL, stderr=open(f"{work}/prometheus.log", "w"))
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if query(web, 'optd_analysis_step{session="it"}'):
                return prometheus, web
        except OSError:
            pass
        if prometheus.poll() is not None:
            raise RuntimeError("prometheus exited: " + open(f"{work}/prometheus.log").read())
        time.sleep(0.2)
    raise TimeoutError("prometheus did not scrape optd")


def query(web, expression):
    url = f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    body = json.loads(http_get(url))
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(web, expression):
    result = query(web, expression)
    assert len(result) == 1, f"{expression}: {result}"
    return float(result[0]["value"][1])


# --- the tests ------------------------------------------------------------------------------

# promtool's linter reads the "ns" of Newton–Schulz as nanoseconds; these two names are fixed by
# DESIGN.md's metric contract, so that one finding on them is the only one allowed.
CONTRACT_LINT = {
    "optd_newton_schulz_polar_error metric names should not contain abbreviated units",
    "optd_newton_schulz_small_sv_fraction metric names should not contain abbreviated units",
}


def test_promtool_accepts_the_exposition(stack):
    run = subprocess.run([PROMTOOL, "check", "metrics"], input=open(
        f"{stack['work']}/exposition.txt").read(), capture_output=True, text=True)
    findings = {line for line in (run.stdout + run.stderr).splitlines() if line.strip()}
    # Exit 3 is "lint problems", 1 would be an exposition that does not parse.
    assert run.returncode in (0, 3) and findings <= CONTRACT_LINT, run.stdout + run.stderr


def test_dashboard_and_rules_name_only_exported_metrics(stack):
    run = subprocess.run([sys.executable, os.path.join(REPO, "tests/deploy/check_deploy.py"),
                          "--repo", REPO, "--exposition", f"{stack['work']}/exposition.txt"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_holds_the_figures_numpy_computes(stack):
    web = stack["web"]
    per_tensor = {}
    for name in SHAPES:
        g = stack["gradients"][name]
        # Step 1 of moonlight's `sum` momentum from zero: V = G; the update is Newton–Schulz of
        # the Nesterov direction G + 0.95·V, times the match-RMS scale 0.2·√max(rows, cols).
        g64 = g.astype(np.float64)
        update = 0.2 * np.sqrt(max(g.shape)) * newton_schulz(g64 + 0.95 * g64)
        per_tensor[name] = reference_figures(g, update, g)
    for key in per_tensor["a"]:
        metric, label, label_value = key
        selector = f'{label}="{label_value}",' if label else ""
        for name, figures in per_tensor.items():
            got = value(web, f'{metric}{{{selector}session="it",tensor="{name}"}}')
            assert got == pytest.approx(figures[key], rel=2e-5, abs=1e-6), (name, key)
        mean = np.mean([figures[key] for figures in per_tensor.values()])
        got = value(web, f'{metric}{{{selector}session="it",tensor=""}}')
        assert got == pytest.approx(mean, rel=2e-5, abs=1e-6), ("session", key)
    assert value(web, 'optd_analysis_step{session="it"}') == 1


def test_prometheus_holds_the_auto_choices(stack):
    web = stack["web"]
    # "d" = diag(1..6) has orthogonal rows: row normalization, so no tensor-level step count (0).
    # "e" keeps Newton–Schulz: from 5 its step count moves to max(k*, 5 − 2) (ns.max_step_change
    # 2), k* the fewest steps in [2, 10] after which Keller's polynomial leaves none of its
    # singular values (numpy's SVD, over the Frobenius norm + 1e-7) below 0.6.
    a, b, c = 3.4445, -4.7750, 2.0315
    sigma = np.linalg.svd(AUTO_E, compute_uv=False)
    sigma = sigma / (np.linalg.norm(AUTO_E) + 1e-7)
    k_star = next((k for k in range(2, 10)
                   if all(x >= 0.6 for x in functools.reduce(
                       lambda x, _: a * x + b * x ** 3 + c * x ** 5, range(k), sigma))), 10)
    steps = max(k_star, 3)
    assert value(web, 'optd_direction{session="auto",tensor="d"}') == 1
    assert value(web, 'optd_direction{session="auto",tensor="e"}') == 0
    assert value(web, 'optd_direction{session="auto",tensor=""}') == 0.5
    assert value(web, 'optd_newton_schulz_steps{session="auto",tensor="d"}') == 0
    assert value(web, 'optd_newton_schulz_steps{session="auto",tensor="e"}') == steps
    assert value(web, 'optd_newton_schulz_steps{session="auto",tensor=""}') == steps / 2
    assert not query(web, 'optd_direction{session="it"}')  # no auto mode, no series


def test_prometheus_holds_the_service_series(stack):
    web = stack["web"]
    # optctl's steps fit one message: StepSmall (one in session "it", one in "auto").
    assert value(web, 'optd_rpc_total{method="StepSmall",code="OK"}') == 2
    assert value(web, 'optd_rpc_total{method="StepSmall",code="FAILED_PRECONDITION"}') == 1
    assert value(web, 'optd_rpc_total{method="StepSmall",code="INVALID_ARGUMENT"}') == 1
    assert value(web, 'optd_rejected_total{reason="wrong_step"}') == 1
    assert value(web, 'optd_rejected_total{reason="nonfinite"}') == 1
    assert value(web, 'optd_rejected_total{reason="queue_full"}') == 0
    assert value(web, 'optd_nonfinite_gradients_total{session="it"}') == 3
    assert value(web, "optd_sessions") == 2
    assert value(web, 'optd_session_step{session="it"}') == 1
    assert value(web, 'optd_step_duration_seconds_count{optimizer="moonlight"}') == 1
    elements = sum(np.prod(s) for s in SHAPES.values()) + 12
    # The good step's fp32 gradients, then the NaN step's tensor 'a' chunk that was refused, and
    # session "auto"'s two 6×6.
    assert value(web, "optd_bytes_received_total") == 4 * (elements + np.prod(SHAPES["a"]) + 72)
    memory = value(web, 'optd_session_memory_bytes{session="it"}')
    assert memory > 0
    assert value(web, "optd_session_memory_limit_bytes") == 16 << 30


def test_every_rule_evaluates_on_the_real_series(stack):
    web = stack["web"]
    deadline = time.time() + 30
    while time.time() < deadline:
        # Instant-vector rules evaluate on the first round: the memory ratio is memory / limit.
        ratio = query(web, 'optd:session_memory:quota_ratio{session="it"}')
        if ratio:
            break
        time.sleep(0.2)
    memory = value(web, 'optd_session_memory_bytes{session="it"}')
    assert float(ratio[0]["value"][1]) == pytest.approx(memory / (16 << 30))
    groups = json.loads(http_get(f"http://{web}/api/v1/rules"))["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 20
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
