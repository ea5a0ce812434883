"""docs/DEPLOY.md only shows commands that a test or a repo script runs.

Scenarios:
- every command in a ```bash block of docs/DEPLOY.md (after its VAR=value
  prefixes) starts with one of COVERED's commands, each of which names the test
  that runs it;
- every deploy/ or scripts/ path the page mentions exists.
"""

from __future__ import annotations

import re
import shlex

from deploy_helpers import REPO

DOC = REPO / "docs" / "DEPLOY.md"

# Command (program and first argument) -> the test that runs it.
COVERED: dict[str, str] = {
    "flashmemory make-tiny": "deploy_helpers.make_tiny_model",
    "flashmemory serve": "tests/vllm/test_serve_e2e.py",
    "deploy/serve.sh": "deploy_helpers.start_lsa_node",
    "deploy/ray/start_node.sh": "test_ray.ray_cluster",
    "deploy/ray/stop_node.sh": "test_ray.ray_cluster (teardown)",
    "deploy/ray/serve.sh": "test_ray.test_vllm_serve_over_ray",
    "python deploy/ray/check_nodes.py": "test_ray.test_every_node_loads_the_plugin",
    "bash scripts/install_system_deps.sh": "test_install_system_deps_is_idempotent",
    "promtool check": "test_prometheus.test_promtool_accepts_config",
    "prometheus --config.file=": "deploy_helpers.start_prometheus",
    "python deploy/grafana/generate_dashboard.py": "test_grafana (--check)",
    "python deploy/grafana/render_panels.py": "test_grafana (render)",
    ".venv/bin/python -m pytest tests/deploy": "itself; .ci/run runs tests/",
}


def doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.DOTALL)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)
            if words:
                commands.append(" ".join(words))
    return commands


def test_every_doc_command_is_covered() -> None:
    commands = doc_commands()
    assert len(commands) >= 10
    uncovered = [c for c in commands if not any(c.startswith(k) for k in COVERED)]
    assert not uncovered, f"docs/DEPLOY.md commands no test runs: {uncovered}"


def test_doc_paths_exist() -> None:
    paths = set(
        re.findall(
            r"(?<![\w/])((?:deploy|scripts)/[\w./-]+\.(?:sh|py|yml|yaml|json))",
            DOC.read_text(),
        )
    )
    assert paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing


def test_install_system_deps_is_idempotent() -> None:
    import subprocess

    from deploy_helpers import require_system_binary

    require_system_binary("prometheus", "prometheus")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "install_system_deps.sh")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "system packages present: prometheus" in proc.stdout
