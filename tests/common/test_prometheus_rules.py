"""deploy/prometheus/rules.yml: valid for Prometheus (``promtool check rules``), each
alert firing when it should and not before (``promtool test rules`` on
deploy/prometheus/tests/), and naming only metrics the services export."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from tools import promtool

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "rules.yml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, cwd=RULES_DIR
    )


def test_rules_pass_promtool_check_rules() -> None:
    done = run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_pass_their_promtool_unit_tests() -> None:
    tests = sorted(str(p) for p in (RULES_DIR / "tests").glob("*.yml"))
    assert tests
    done = run("test", "rules", *tests)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_name_only_exported_metrics() -> None:
    from services.predictor import metrics as predictor
    from services.scheduler import metrics as scheduler
    from services.worker import metrics as worker

    exported = {"up"}
    for registry in (scheduler.REGISTRY, predictor.REGISTRY, worker.REGISTRY):
        for family in registry.collect():  # (a labelled family may have no sample yet)
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            exported.update(family.name + s for s in suffixes.get(family.type, ("",)))
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = " ".join(rule["expr"] for g in groups for rule in g["rules"])
    used = set(re.findall(r"\b(shortline_\w+|up)\b(?=\{|\[|\)|\s)", exprs))
    assert used and used <= exported, sorted(used - exported)


def test_the_compose_prometheus_loads_these_rules(tmp_path: Path) -> None:
    """deploy/prometheus.yml names the path docker-compose.yml mounts rules.yml at, and
    passes ``promtool check config`` with it (the path moved to this test's copy)."""
    root = RULES_DIR.parent.parent
    config = yaml.safe_load((RULES_DIR.parent / "prometheus.yml").read_text())
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    (mounted,) = [m.split(":")[1] for m in mounts if m.startswith("./deploy/prometheus/rules.yml")]
    assert config["rule_files"] == [mounted]
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    config["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = run("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
