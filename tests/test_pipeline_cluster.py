"""`make run` starts one local Ray cluster and every stage joins it (a real cluster in a subprocess: the
test session's own cluster is already initialised in this process)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGE = textwrap.dedent("""
    import os, ray
    from ray.util.state import list_nodes
    from training.loop import ensure_ray
    ensure_ray()  # what every training stage calls: it must join, not start, a cluster
    nodes = list_nodes()  # the State API answers: the dashboard runs, so Ray Train's cleaner stays quiet
    print("STAGE", ray.get_runtime_context().gcs_address, len(nodes), flush=True)
""")

DRIVER = textwrap.dedent("""
    import os, subprocess, sys
    from pipelines.main import shared_ray_cluster
    with shared_ray_cluster() as address:
        env = dict(os.environ, RAY_ADDRESS=address)
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", sys.argv[1]], env=env, capture_output=True, text=True)
            print(out.stdout, out.stderr[-2000:] if out.returncode else "", flush=True)
            assert out.returncode == 0
        # a driver without the token (auth off, or a wrong token) is refused at the GCS; one connect try
        for name, extra in (("NOAUTH", {"RAY_AUTH_MODE": "disabled"}),
                            ("WRONGTOKEN", {"RAY_AUTH_TOKEN": "0" * 64})):
            bad = dict(env, RAY_gcs_server_port_wait_time_s="1", **extra)
            out = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print('ATTACHED')"], env=bad,
                                 capture_output=True, text=True, timeout=120)
            print(name, out.returncode, "ATTACHED" in out.stdout, "InvalidAuthToken" in out.stderr, flush=True)
        print("DRIVER", address, flush=True)
""")


def test_every_stage_joins_the_one_cluster_make_run_started():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    out = subprocess.run([sys.executable, "-c", DRIVER, STAGE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    driver = [line.split() for line in out.stdout.splitlines() if line.startswith("DRIVER")]
    stages = [line.split() for line in out.stdout.splitlines() if line.startswith("STAGE")]
    assert len(driver) == 1 and len(stages) == 2
    address = driver[0][1]
    assert all(s[1] == address and s[2] == "1" for s in stages), (driver, stages)
    assert "started in" in out.stdout and "every stage joins it" in out.stdout
    # Ray's ports listen on every interface (no loopback-only bind in Ray 2.60): its token auth keeps
    # strangers out, and the token file is the user's alone
    refused = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
               if line.startswith(("NOAUTH", "WRONGTOKEN"))}
    assert refused == {"NOAUTH": ["1", "False", "True"], "WRONGTOKEN": ["1", "False", "True"]}, out.stdout[-3000:]
    assert (Path.home() / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
