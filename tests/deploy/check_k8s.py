#!/usr/bin/python3
"""Checks deploy/'s Kubernetes manifests, systemd unit and container file against the optd this
tree builds.

  check_k8s.py --repo DIR --optd BUILT_OPTD kubernetes   # yamllint, kubectl kustomize, structure
  check_k8s.py --repo DIR --optd BUILT_OPTD host         # systemd unit and Containerfile

Every optd flag a manifest or unit passes must be one `optd --help` documents. Exit 77 (skip) when
the tool a part needs (kubectl) is missing."""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

FAILURES = []


def check(ok, message):
    if not ok:
        FAILURES.append(message)
        print("FAIL:", message)


def optd_flags(optd):
    run = subprocess.run([optd, "--help"], capture_output=True, text=True, check=False)
    return set(re.findall(r"--([a-z_0-9]+)", run.stdout + run.stderr))


def check_args(args, flags, where):
    for arg in args:
        name = arg.split("=", 1)[0].lstrip("-")
        check(arg.startswith("--") and name in flags, f"{where}: '{arg}' is not an optd flag")
        if name == "drain_timeout_s":
            yield float(arg.split("=", 1)[1])


def kustomize(directory):
    run = subprocess.run(["kubectl", "kustomize", directory], capture_output=True, text=True,
                         check=False)
    check(run.returncode == 0, f"kubectl kustomize {directory}: {run.stderr.strip()}")
    return [d for d in yaml.safe_load_all(run.stdout) if d] if run.returncode == 0 else []


def kustomize_with_component(base, overlay, component):
    """The rendered documents of `overlay` with `component` on top."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kustomization.yaml"), "w") as f:
            # kustomize takes relative roots only.
            resources = os.path.relpath(os.path.join(base, "overlays", overlay), tmp)
            components = os.path.relpath(os.path.join(base, "components", component), tmp)
            f.write(f"resources: [{resources}]\ncomponents: [{components}]\n")
        return kustomize(tmp)


def check_rendered(docs, flags, variant):
    kinds = {d["kind"]: d for d in docs}
    check(set(kinds) >= {"StatefulSet", "Service"}, f"{variant}: kinds {sorted(kinds)}")
    sts, svc = kinds.get("StatefulSet"), kinds.get("Service")
    if not sts or not svc:
        return
    pod = sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    check(sts["spec"]["selector"]["matchLabels"].items() <= labels.items(),
          f"{variant}: the StatefulSet's selector does not match its pods")
    check(svc["spec"].get("clusterIP") == "None", f"{variant}: the Service is not headless")
    check(svc["spec"]["selector"].items() <= labels.items(),
          f"{variant}: the Service's selector does not match the pods")
    check(sts["spec"]["serviceName"] == svc["metadata"]["name"],
          f"{variant}: serviceName is not the headless Service")
    container = pod["spec"]["containers"][0]
    drains = list(check_args(container["args"], flags, variant))
    check(len(drains) == 1, f"{variant}: --drain_timeout_s is not set once")
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    check(drains and grace > drains[0] + 30,
          f"{variant}: terminationGracePeriodSeconds {grace} leaves no time to checkpoint after "
          f"the drain")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"] if "=" in a)
    check(args.get("listen", "").endswith(f":{ports.get('grpc')}"),
          f"{variant}: --listen does not match the grpc port")
    check(args.get("metrics_addr", "").endswith(f":{ports.get('metrics')}"),
          f"{variant}: --metrics_addr does not match the metrics port")
    annotations = pod["metadata"].get("annotations", {})
    check(annotations.get("prometheus.io/port") == str(ports.get("metrics")),
          f"{variant}: the scrape annotation's port is not the metrics port")
    for probe, service in [("livenessProbe", ""), ("readinessProbe", "optd.v1.Optimizer"),
                           ("startupProbe", "")]:
        grpc = container.get(probe, {}).get("grpc", {})
        check(grpc.get("port") == ports.get("grpc") and grpc.get("service") == service,
              f"{variant}: {probe} is not gRPC health on the grpc port for '{service}'")
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    claims = [c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])]
    check(any(mounts.get(c) == args.get("state_dir") for c in claims),
          f"{variant}: no per-pod volume is mounted at --state_dir")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    check(svc_ports >= {"grpc", "metrics"}, f"{variant}: Service ports {sorted(svc_ports)}")
    limits = container["resources"].get("limits", {})
    if variant == "gpu":
        check(limits.get("nvidia.com/gpu") == 1, "gpu: no nvidia.com/gpu limit")
        check(args.get("backend") == "cuda", "gpu: --backend is not cuda")
    else:
        check("nvidia.com/gpu" not in limits, f"{variant}: asks for a GPU")
        check(args.get("backend") == "cpu", f"{variant}: --backend is not cpu")


def kubernetes(repo, flags):
    base = os.path.join(os.path.abspath(repo), "deploy", "kubernetes")
    yamllint = shutil.which("yamllint")
    if yamllint:
        config = ("{extends: default, rules: {line-length: {max: 100}, document-start: disable, "
                  "truthy: {check-keys: false}}}")
        run = subprocess.run([yamllint, "-d", config, base], capture_output=True, text=True,
                             check=False)
        check(run.returncode == 0, f"yamllint: {run.stdout.strip()}")
    else:
        print("yamllint not found: style not checked")
    if not shutil.which("kubectl"):
        print("kubectl not found: the kustomizations cannot be built here")
        return 77
    for variant in ("cpu", "gpu"):
        check_rendered(kustomize(os.path.join(base, "overlays", variant)), flags, variant)
    # The ServiceMonitor component on top of an overlay.
    docs = kustomize_with_component(base, "gpu", "servicemonitor")
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    services = [d for d in docs if d["kind"] == "Service"]
    check(len(monitors) == 1 and services and
          monitors[0]["spec"]["selector"]["matchLabels"].items() <=
          services[0]["metadata"]["labels"].items() and
          monitors[0]["spec"]["endpoints"][0]["port"] in
          {p["name"] for p in services[0]["spec"]["ports"]},
          "the ServiceMonitor does not select the Service's metrics port")
    # The resharding component: every pod mounts one ReadWriteMany claim at the shared state
    # root it names, beside its own state volume.
    docs = kustomize_with_component(base, "cpu", "resharding")
    check_rendered([d for d in docs if d["kind"] != "PersistentVolumeClaim"], flags, "cpu")
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pod = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    roots = [a.split("=", 1)[1] for a in container["args"]
             if a.startswith("--shared_state_root=")]
    volume = next((v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v), None)
    mount = next((m for m in container["volumeMounts"]
                  if volume and m["name"] == volume["name"]), None)
    claim = claims.get(volume["persistentVolumeClaim"]["claimName"]) if volume else None
    check(len(roots) == 1 and mount is not None and mount["mountPath"] == roots[0] and
          claim is not None and claim["spec"]["accessModes"] == ["ReadWriteMany"],
          "resharding: --shared_state_root is not a ReadWriteMany claim mounted there")
    check(not roots or
          not any(a.startswith("--state_dir=" + roots[0]) for a in container["args"]),
          "resharding: the state directory should stay on the pod's own volume")
    return 0


def host(repo, optd, flags):
    unit = os.path.join(repo, "deploy", "systemd", "optd.service")
    text = open(unit).read()
    exec_start = re.search(r"^ExecStart=(\S+)(.*)$", text, re.M)
    args = [a for a in exec_start.group(2).split() if a.startswith("--")]
    drains = list(check_args(args, flags, "optd.service"))
    stop = re.search(r"^TimeoutStopSec=(\d+)", text, re.M)
    check(drains and stop and int(stop.group(1)) > drains[0] + 30,
          "optd.service: TimeoutStopSec leaves no time to checkpoint after the drain")
    analyze = shutil.which("systemd-analyze")
    if analyze:
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "optd.service")
            with open(copy, "w") as f:
                f.write(text.replace(exec_start.group(1), os.path.abspath(optd)))
            run = subprocess.run([analyze, "verify", copy], capture_output=True, text=True,
                                 check=False)
            check(run.returncode == 0, f"systemd-analyze verify: {run.stderr.strip()}")
    else:
        print("systemd-analyze not found: the unit is not verified")

    containerfile = open(os.path.join(repo, "deploy", "container", "Containerfile")).read()
    for line in re.findall(r"^ARG \w+_BASE=(\S+)", containerfile, re.M):
        check(line.startswith("debian:bookworm"), f"Containerfile: base {line} is not bookworm")
    check(not re.search(r"\b(curl|wget|pip|ADD\s+https?:)", containerfile),
          "Containerfile downloads something")
    check("scripts/install-deps" in containerfile,
          "Containerfile: the build stage does not use scripts/install-deps")
    installed = set(re.findall(r"\b(lib[a-z0-9+.\-]+|zlib1g|ca-certificates)\b",
                               containerfile.split("FROM ${RUNTIME_BASE}", 1)[-1]))
    build = os.path.dirname(os.path.dirname(os.path.abspath(optd)))
    libraries = set()
    for binary in (optd, os.path.join(build, "client", "optctl"),
                   os.path.join(build, "client", "optd-loadgen")):
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
        libraries.update(os.path.realpath(p) for p in re.findall(r"=> (\S+)", ldd))
    # One dpkg query for all; libraries of no package (the CUDA toolkit's) are not listed.
    owners = subprocess.run(["dpkg", "-S"] + sorted(libraries), capture_output=True, text=True,
                            check=False).stdout
    packages = {line.split(":", 1)[0] for line in owners.splitlines() if ":" in line}
    check(len(packages) > 5, f"dpkg found the packages of only {sorted(packages)}")
    for package in sorted(packages - {"libc6", "libgcc-s1"}):  # in every Debian image
        check(package in installed, f"Containerfile: the binaries need {package}, not installed")
    return 0


def self_test(repo, optd, flags):
    """The checks on broken copies: each break must be caught."""
    breaks = [
        ("kubernetes", "deploy/kubernetes/base/statefulset.yaml",
         "terminationGracePeriodSeconds: 90", "terminationGracePeriodSeconds: 40", "leaves no time"),
        ("kubernetes", "deploy/kubernetes/base/statefulset.yaml",
         "service: optd.v1.Optimizer", "service: optd.v1.Nope", "readinessProbe"),
        ("kubernetes", "deploy/kubernetes/base/statefulset.yaml",
         "--idle_ttl_s=3600", "--idle_ttl=3600", "is not an optd flag"),
        ("kubernetes", "deploy/kubernetes/components/resharding/shared-state.yaml",
         "accessModes: [ReadWriteMany]", "accessModes: [ReadWriteOnce]", "ReadWriteMany"),
        ("host", "deploy/container/Containerfile", "libprotobuf32 ", "", "need libprotobuf32"),
        ("host", "deploy/systemd/optd.service", "TimeoutStopSec=90", "TimeoutStopSec=35",
         "TimeoutStopSec"),
    ]
    missed = 0
    for part, path, old, new, expected in breaks:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.join(repo, "deploy"), os.path.join(tmp, "deploy"))
            target = os.path.join(tmp, path)
            text = open(target).read()
            assert old in text, (path, old)
            open(target, "w").write(text.replace(old, new))
            FAILURES.clear()
            if part == "kubernetes":
                if kubernetes(tmp, flags) == 77:
                    continue
            else:
                host(tmp, optd, flags)
            caught = any(expected in f for f in FAILURES)
            print(f"self-test: {path}: '{old}' -> '{new}': {'caught' if caught else 'MISSED'}")
            missed += not caught
    FAILURES.clear()
    return 1 if missed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--optd", required=True)
    parser.add_argument("part", choices=["kubernetes", "host", "self-test"])
    args = parser.parse_args()
    flags = optd_flags(args.optd)
    if args.part == "self-test":
        return self_test(os.path.abspath(args.repo), args.optd, flags)
    check(len(flags) > 20, f"optd --help listed only {sorted(flags)}")
    code = kubernetes(args.repo, flags) if args.part == "kubernetes" else host(args.repo,
                                                                              args.optd, flags)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        return 1
    if code == 77:
        return 77
    print(f"deploy/ {args.part}: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
