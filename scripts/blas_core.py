"""Runs this script's numpy and torch on the OpenBLAS kernels optd runs.

optd restarts itself onto the kernels a CPU's features call for where OpenBLAS took the CPU for an
older one (kernels/cpu/openblas_core.h: Debian's OpenBLAS 0.3.21 takes Intel models newer than it
for Prescott's SSE3 kernels). numpy and torch load the same OpenBLAS, and a script that compares
them with optd (bench/numpy_ns.py, scripts/main_job.py, bench/overlap.py) calls
match_optd_kernels() before importing them: where OPENBLAS_CORETYPE is not set, it asks optd
(`optd --print_openblas_core`) and runs the script again with it set, so both sides of every ratio
multiply with the same kernels. An OPENBLAS_CORETYPE already set is kept.
"""
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def optd_binary(argv):
    """The daemon the script will start: the value of --optd, else the build tree's."""
    for i, arg in enumerate(argv):
        if arg == "--optd" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--optd="):
            return arg[len("--optd="):]
    return os.path.join(REPO, "build", "server", "optd")


def match_optd_kernels(argv=None):
    """Replaces this process with itself under optd's OpenBLAS core; returns where nothing is to
    be done (OPENBLAS_CORETYPE set, no optd binary, or --server: a daemon elsewhere)."""
    argv = sys.argv if argv is None else argv
    if "OPENBLAS_CORETYPE" in os.environ or any(a.startswith("--server") for a in argv):
        return
    binary = optd_binary(argv)
    if not os.access(binary, os.X_OK):
        return
    core = subprocess.run([binary, "--print_openblas_core"], check=True, capture_output=True,
                          text=True).stdout.strip()
    os.environ["OPENBLAS_CORETYPE"] = core
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + argv)
