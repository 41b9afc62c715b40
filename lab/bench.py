"""`make bench`: bring-up times and load-generator rates, printed, never asserted.

Figures, measured in one run on this machine:
- bring-up cold (base image built from Debian's packages in an empty cache) and warm;
- the lab's load generator against the stand-in, next to WorkBinder's own Java test client
  started once per request at the same concurrency (when a WorkBinder tree is given and
  `java` is on the host).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lab.binder.tree import binder_home_from
from lab.engines.images import base_image_tag, debian_mirror, ensure_base_image
from lab.engines.podman import podman_env
from lab.lab import Lab
from lab.protocol.client import Success, closed_loop
from lab.scenarios.schema import Scenario

console = Console()

BENCH_SCENARIO = {
    "name": "bench",
    "binder": {"pool": {"min_pool_size": 4, "min_jobs_on_ce": 4, "max_jobs_on_ce": 4}},
    "standin": {"reconnect_delay_ms": 0, "worker_runs": 1_000_000},
}


def cold_base_image() -> float:
    """Seconds to build the base image with nothing cached (the cache is put back after)."""
    scratch = Path(tempfile.mkdtemp(prefix="lab-bench-"))
    env = podman_env(scratch)
    mirror = debian_mirror()
    tag = base_image_tag(mirror)
    subprocess.run(["podman", "rmi", "-f", tag], env=env, capture_output=True, check=False)
    previous = os.environ.get("LAB_CACHE_DIR")
    os.environ["LAB_CACHE_DIR"] = str(scratch / "cache")  # an empty cache, for this build only
    try:
        started = time.monotonic()
        ensure_base_image(env, mirror)
        return time.monotonic() - started
    finally:
        if previous is None:
            os.environ.pop("LAB_CACHE_DIR", None)
        else:
            os.environ["LAB_CACHE_DIR"] = previous
        shutil.rmtree(scratch, ignore_errors=True)


def loadgen_rate(lab: Lab, clients: int, seconds: float) -> tuple[float, float, int]:
    """Successful requests/s, the generator's CPU share, and refusals."""
    cpu, wall = time.process_time(), time.monotonic()
    outcomes = asyncio.run(
        closed_loop(
            "127.0.0.1",
            lab.binder.endpoint.port,
            clients=clients,
            duration=seconds,
            retry_delay=0.0,
        )
    )
    elapsed = time.monotonic() - wall
    ok = sum(isinstance(o, Success) for o in outcomes)
    refused = sum(o.KIND == "refused" for o in outcomes)
    return ok / elapsed, (time.process_time() - cpu) / elapsed, refused


def java_client_rate(home: Path, port: int, clients: int, seconds: float) -> float:
    """Requests/s of WorkBinder's TestClient, one JVM per request, `clients` at a time."""
    props = Path(tempfile.mkdtemp(prefix="lab-bench-client-")) / "client.properties"
    props.write_text(
        f"BinderAddress = 127.0.0.1\nBinderPort = {port}\nCandidateCE = \n"
        "ApplicationID = TEST\nRequiredWallClockTime = 1000\nUseSSL = off\nAccessString = \n"
    )
    argv = [
        "java",
        "-cp",
        f"{home}/bin:{home}/lib/log4j-1.2.15.jar",
        "yu.ac.bg.rcub.binder.test.TestClient",
        str(props),
        "0",
    ]
    stop_at = time.monotonic() + seconds

    def one_client() -> int:
        done = 0
        while time.monotonic() < stop_at:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
            done += "Binder PING-PONG 3. time" in out
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(lambda _: one_client(), range(clients)))
    return total / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold base image build")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per load level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args(argv)
    figures = Table(title="workbinder-lab bench (figures, not assertions)")
    figures.add_column("what")
    figures.add_column("figure", justify="right")

    if not args.no_cold:
        console.print("cold: building the base image from Debian's packages ...")
        figures.add_row(
            "base image, cold build (debootstrap + import)", f"{cold_base_image():.1f} s"
        )
    scenario = Scenario.model_validate(BENCH_SCENARIO)
    runs = Path(tempfile.mkdtemp(prefix="lab-bench-runs-"))
    for label in ("first", "warm"):
        with Lab(scenario, runs_root=runs) as lab:
            started = time.monotonic()
            lab.up()
            total = time.monotonic() - started
            figures.add_row(f"bring-up {label}: engine up", f"{lab.times.engine_up:.2f} s")
            figures.add_row(f"bring-up {label}: image built", f"{lab.times.binder_prepared:.2f} s")
            figures.add_row(f"bring-up {label}: pool of 4 full", f"{total:.2f} s")
            if label == "warm":
                home = binder_home_from(None)
                for clients in args.clients:
                    rate, cpu, refused = loadgen_rate(lab, clients, args.seconds)
                    figures.add_row(
                        f"python load generator, {clients} clients, stand-in",
                        f"{rate:.1f} ok/s (cpu {cpu:.0%}, {refused} refused)",
                    )
                    if home is not None and shutil.which("java"):
                        java = java_client_rate(
                            home, lab.binder.endpoint.port, clients, args.seconds
                        )
                        figures.add_row(
                            f"WorkBinder TestClient, {clients} clients, stand-in",
                            f"{java:.1f} ok/s (one JVM per request)",
                        )
    shutil.rmtree(runs, ignore_errors=True)
    console.print(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
