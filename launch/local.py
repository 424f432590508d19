#!/usr/bin/env python3
"""Start N local processes of one mi-jax command on 127.0.0.1 (JAX's gloo CPU collectives), for
tests and laptops:

    python launch/local.py --processes 2 --cpu-devices 2 -- mi-jax train --config ... --workdir ...
    python launch/local.py --processes 2 --cpu-devices 1 -- mi-jax generate --checkpoint RUN ... --out talk.mp4

Each process gets MI_JAX_COORDINATOR / MI_JAX_NUM_PROCESSES / MI_JAX_PROCESS_ID (read by
mi_jax.parallel.distributed.maybe_initialize) and, with --cpu-devices, that many CPU devices.
Output lines are prefixed with the process index; if one process fails the others are stopped
and the exit code is the first failure's. `mi-jax generate` runs its window step on a mesh over
every process's devices; process 0 writes the mp4, the others exit 0 without writing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading


def free_port() -> int:
    try:
        import portpicker

        return portpicker.pick_unused_port()
    except ImportError:  # pragma: no cover
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _pump(stream, prefix):
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cpu-devices", type=int, default=0, help="CPU devices per process (0: real accelerators)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- mi-jax train --config ...")
    port = args.port or free_port()
    procs = []
    for i in range(args.processes):
        env = dict(os.environ, MI_JAX_COORDINATOR=f"127.0.0.1:{port}", MI_JAX_NUM_PROCESSES=str(args.processes),
                   MI_JAX_PROCESS_ID=str(i))
        if args.cpu_devices:
            env["MI_JAX_CPU_DEVICES"] = str(args.cpu_devices)
            env["JAX_PLATFORMS"] = "cpu"
            env.pop("XLA_FLAGS", None)  # the device count comes from MI_JAX_CPU_DEVICES
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] "), daemon=True).start()
        procs.append(p)
    code = 0
    remaining = list(procs)
    while remaining:
        for p in list(remaining):
            rc = p.poll()
            if rc is None:
                continue
            remaining.remove(p)
            if rc != 0 and code == 0:
                code = rc
                for q in remaining:
                    q.terminate()
        if remaining:
            try:
                remaining[0].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
