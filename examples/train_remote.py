"""Train a model of your own through optd, save the optimizer's state with torch.save, and resume
from it in a new optimizer (a new session).

    /usr/bin/python3 examples/train_remote.py --server 127.0.0.1:50051   # a running optd
    /usr/bin/python3 examples/train_remote.py --optd build/server/optd   # starts its own
(PYTHONPATH=build/python, or the package installed with pip.)"""
import argparse, os, subprocess, tempfile, time

import torch

import optd
from optd.torch import RemoteOptimizer


def start(binary):
    port_file = os.path.join(tempfile.mkdtemp(), "port")
    daemon = subprocess.Popen([binary, "--listen=127.0.0.1:0", f"--port_file={port_file}",
                               "--metrics_addr="])
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        time.sleep(0.05)
    return daemon, "127.0.0.1:" + open(port_file).read().strip()


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 1))


def train(model, optimizer, first, last):
    for step in range(first, last + 1):
        x = torch.randn(128, 16, generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.mse_loss(model(x), x[:, :4].sum(1, keepdim=True).sin())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)


parser = argparse.ArgumentParser()
parser.add_argument("--server", help="host:port of a running optd")
parser.add_argument("--optd", default="build/server/optd", help="else start this binary")
args = parser.parse_args()
daemon, address = (None, args.server) if args.server else start(args.optd)
path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
with optd.Client(address) as client:
    torch.manual_seed(0)
    model = make_model()
    with RemoteOptimizer(model.named_parameters(), client, preset="keller", lr=0.02) as opt:
        train(model, opt, 1, 50)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    model, saved = make_model(), torch.load(path)  # later, elsewhere: resume from the file
    model.load_state_dict(saved["model"])
    with RemoteOptimizer(model.named_parameters(), client, preset="keller", lr=0.02) as opt:
        opt.load_state_dict(saved["optimizer"])
        print(f"resumed at step {opt.steps} from {path}")
        train(model, opt, opt.steps + 1, 100)
if daemon is not None:
    daemon.terminate()
