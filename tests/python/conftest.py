"""A real optd daemon for the Python tests: the binary in $OPTD (default build/server/optd),
started on a free loopback port, checkpointing into a temporary directory."""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OPTD = os.environ.get("OPTD", os.path.join(REPO, "build/server/optd"))


def start_daemon(*extra_args, state_dir=None):
    """Starts an optd checkpointing into `state_dir` (default: a directory of its own); returns
    its "host:port" and a stop() that SIGTERMs it and returns its exit code."""
    work = tempfile.mkdtemp(prefix="optd_python_")
    log = open(f"{work}/optd.log", "w")
    process = subprocess.Popen(
        [OPTD, "--listen=127.0.0.1:0", f"--port_file={work}/port", "--metrics_addr=",
         f"--state_dir={state_dir or work + '/state'}", "--threads=1", *extra_args], stderr=log)

    def stop():
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
        return code

    deadline = time.time() + 30
    while not (os.path.exists(f"{work}/port") and open(f"{work}/port").read().strip()):
        if process.poll() is not None or time.time() > deadline:
            stop()
            raise RuntimeError("optd did not start: " + open(f"{work}/optd.log").read())
        time.sleep(0.05)
    return f"127.0.0.1:{open(f'{work}/port').read().strip()}", stop


@pytest.fixture(scope="session")
def daemon():
    """The daemon's "host:port"; it is stopped with SIGTERM (and must exit 0) at the end."""
    address, stop = start_daemon()
    try:
        yield address
    finally:
        code = stop()
        assert code == 0, f"optd exited with {code}"


def start_shared_daemons(root, count):
    """`count` optds sharing the state root `root` as instances "i0", "i1", ..., each with its
    directory there as its state directory; returns their (address, stop) pairs."""
    return [start_daemon(f"--shared_state_root={root}", f"--instance_name=i{i}",
                         state_dir=f"{root}/i{i}") for i in range(count)]
