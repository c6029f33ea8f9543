"""Small shared builders for tests: `from helpers import ...` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

DVC = str(Path(sys.executable).with_name("dvc"))  # the venv's dvc, whichever python runs the tests


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run tiny models single-threaded: on a shared 2-core box, intra-op threads of small tensors
    spin against each other (measured: 40 tiny predictor steps 0.4 s on 1 thread, 17 s on 2 under load)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started with start_new_session=True, and all its children; SIGKILL after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


S3_ENV = {"AWS_ACCESS_KEY_ID": "cxrcf-test", "AWS_SECRET_ACCESS_KEY": "cxrcf-test", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_client(endpoint: str):
    """boto3 S3 client of the test S3 server at `endpoint`, with the test credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 240) -> None:
    """Until `url` answers below 500; fails with the server's log if it exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} did not answer at {url}:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@contextlib.contextmanager
def moto_s3(root: Path, bucket: str) -> Iterator[str]:
    """moto's S3 server (server mode) on a free loopback port with `bucket` created; yields its endpoint URL."""
    root.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{free_port()}"
    log_path = root / "moto.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                 "-p", url.rsplit(":", 1)[1]], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"{url}/", proc, log_path, "moto S3 server", timeout_s=60)
        s3_client(url).create_bucket(Bucket=bucket)
        yield url
    finally:
        stop_group(proc)


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the OS picks it; it is closed again on return)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_uri() -> str:
    """An http URI where nothing listens: a tracking server that is down."""
    return f"http://127.0.0.1:{free_port()}"


def run_ok(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    """Run a command and return its stdout + stderr; a non-zero exit fails the test with the output's
    tail (a failing `dvc repro` or `git` call says why there, not in an exception)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def git_dvc_repo(repo: Path, env: dict | None = None) -> Path:
    """A new git repository with DVC initialised in `repo`; it carries its own committer identity,
    since a test machine's git usually has none and `git commit` refuses without one."""
    repo.mkdir(parents=True, exist_ok=True)
    run_ok(["git", "init", "-q"], repo, env)
    run_ok(["git", "config", "user.email", "ci@cxrcf.local"], repo, env)
    run_ok(["git", "config", "user.name", "cxrcf ci"], repo, env)
    run_ok([DVC, "init", "-q"], repo, env)
    return repo


FINDING_AGE_CENTRE = 55.0
FINDING_AGE_SPREAD = 15.0


def finding_probability(age_years, slope: float = 1.2, bias: float = -0.9):
    """P(finding = 1 | age) of the synthetic parents below: a logistic function of standardised age."""
    age = torch.as_tensor(age_years, dtype=torch.float32)
    return torch.sigmoid(slope * (age - FINDING_AGE_CENTRE) / FINDING_AGE_SPREAD + bias)


def synthetic_parents(n: int, seed: int = 0, slope: float = 1.2, bias: float = -0.9) -> dict[str, torch.Tensor]:
    """Parents drawn by hand from a known SCM (sex 30% female, race 60/15/25, age ~ N(55, 15) clipped,
    finding ~ Bernoulli(finding_probability(age)))."""
    g = torch.Generator().manual_seed(seed)
    age = (torch.randn(n, generator=g) * FINDING_AGE_SPREAD + FINDING_AGE_CENTRE).clamp(1.0, 110.0)
    finding = (torch.rand(n, generator=g) < finding_probability(age, slope, bias)).float()
    return {
        "sex": (torch.rand(n, generator=g) < 0.3).float(),
        "race": torch.multinomial(torch.tensor([0.6, 0.15, 0.25]), n, replacement=True, generator=g),
        "age": age,
        "finding": finding,
    }


def tiny_bundle(seed: int = 0):
    """A small, untrained-but-valid GeneratorBundle: smoke-preset HVAE and evaluation predictor
    (seeded initialisation) and an SCM fitted briefly on `synthetic_parents`. The global torch RNG
    state is left as it was."""
    from cxrcf.bundle import GeneratorBundle
    from cxrcf.config import SCMConfig, preset_params
    from cxrcf.hvae import HVAE
    from cxrcf.predictor import Predictor
    from cxrcf.scm import AttributeSCM

    params = preset_params("smoke")
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(seed)
        hvae = HVAE(params.generator.arch)
        predictor = Predictor(params.predictors.evaluation.arch)
        scm = AttributeSCM(SCMConfig(steps=60, lr=3e-2, seed=seed))
        scm.fit(synthetic_parents(512, seed=seed))
    meta = {"name": "tiny", "mode": "none", "preset": "smoke", "metrics": {}, "lineage": {"seed": seed}}
    return GeneratorBundle(hvae, scm, predictor, meta)


def occlusion_evaluator(n: int = 64, res: int = 8, seed: int = 0):
    """A stand-in for pipelines.evaluate._Evaluator, as pipelines.occlusion.analyse reads it.

    The lower half of each image holds the sex cue (+0.5 female, -0.5 male) and the predictor reads
    its contrast, P(female) = sigmoid(4 x mean of the lower half); row 0 is where an "effusion" shows,
    P(finding) = sigmoid(10 x mean of row 0).
    """
    from types import SimpleNamespace

    import numpy as np

    rng = np.random.default_rng(seed)
    sex = rng.integers(0, 2, n)
    finding = rng.integers(0, 2, n)
    x = torch.zeros(n, 1, res, res)
    x[:, :, res // 2:, :] = torch.as_tensor(np.where(sex == 1, 0.5, -0.5), dtype=torch.float32)[:, None, None, None]

    def predict(images):
        cue = images[..., res // 2:, :].mean(dim=(1, 2, 3))
        fluid = images[..., 0, :].mean(dim=(1, 2))
        return {"sex": torch.sigmoid(4 * cue).numpy(), "finding": torch.sigmoid(10 * fluid).numpy()}

    ev = SimpleNamespace(resolution=res, x=x, parents_np={"sex": sex, "finding": finding})
    ev._predict = predict
    ev.real_probs = predict(x)
    return ev
