"""The wheel, installed into a clean virtualenv as a user would: the base install is the SDK and the
kubectl plugin (no operator dependencies, no dev tooling), the `operator` extra adds the operator."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, f"{' '.join(map(str, args))}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out, REPO)
    (built,) = out.glob("workorder_operator-*.whl")
    return built


def test_base_install_for_agent_authors_and_the_operator_extra(wheel: Path, tmp_path: Path) -> None:
    venv.create(tmp_path / "v", with_pip=True)
    bin_ = tmp_path / "v" / "bin"
    pip = (bin_ / "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check")
    run(*pip, wheel)
    assert "usage: kubectl workorder" in run(bin_ / "kubectl-workorder", "--help").stdout  # kubectl plugin style
    run(bin_ / "python", "-c", "from workorder_operator.agent import Agent, Failure; import workorder_operator.kube")
    installed = run(bin_ / "pip", "list", "--format=freeze").stdout.lower()
    for absent in ("kopf", "prometheus-client", "cryptography", "pytest"):  # (kubernetes itself needs aiohttp)
        assert f"{absent}==" not in installed, f"{absent} is not for agent authors:\n{installed}"
    # Dev tooling is not shipped: neither where it used to live nor under its own name.
    assert run(bin_ / "python", "-c", "import workorder_operator.envtest", check=False).returncode != 0
    assert run(bin_ / "python", "-c", "import devcluster", check=False).returncode != 0
    operator = run(bin_ / "workorder-operator", "--help", check=False)
    assert operator.returncode != 0 and "pip install 'workorder-operator[operator]'" in operator.stderr
    build_agent = run(bin_ / "workorder-build-agent", "--help", check=False)
    assert build_agent.returncode != 0 and "pip install 'workorder-operator[operator]'" in build_agent.stderr
    # The extra adds what the operator needs, and only that.
    run(*pip, f"{wheel}[operator]")
    assert "usage: workorder-operator" in run(bin_ / "workorder-operator", "--help").stdout
    assert "--hub-kubeconfig" in run(bin_ / "workorder-build-agent", "--help").stdout
    # cryptography: the self-signed certificate of the secure metrics endpoint.
    assert "cryptography==" in run(bin_ / "pip", "list", "--format=freeze").stdout.lower()
