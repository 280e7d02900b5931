"""deploy/docker/Dockerfile read as data, so tests replay its build stage without Docker.

No Docker engine runs here or in CI. The wheel test copies what the build stage
COPYs and runs the same ``make`` commands its RUN lines run, so a change to the
Dockerfile is a change to what the test builds.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from shortline.common.paths import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    """Stages in order, each with its (KEYWORD, arguments) instructions."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued RUN
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    found: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append(Stage(base=words[0], name=name))
        else:
            assert found, f"{keyword} before FROM"
            found[-1].instructions.append((keyword, rest))
    return found


def make_commands(stage: Stage) -> list[list[str]]:
    """The stage's RUN lines that are plain ``make`` calls, as argv lists."""
    return [shlex.split(run) for run in stage.args("RUN") if run.split()[0] == "make"]


def copied_sources(stage: Stage) -> list[str]:
    """Paths the stage copies from the build context (not from other stages)."""
    sources: list[str] = []
    for rest in stage.args("COPY"):
        words = [w for w in rest.split() if not w.startswith("--")]
        if "--from=" in rest:
            continue
        sources += words[:-1]
    return sources
