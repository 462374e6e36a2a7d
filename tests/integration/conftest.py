from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.integration.harness import Agent, StartAgent


@pytest.fixture(autouse=True)
def _needs_root_and_real_tools() -> None:
    require_root_and_tools("sshd", "unshare", "ssh-keygen", "nsenter")


@pytest.fixture
def start_agent() -> Iterator[StartAgent]:
    """start_agent(root) -> a running, ready Agent; every agent is stopped (and must exit 0) at teardown."""
    agents: list[Agent] = []

    def start(
        root: Path,
        ready: bool = True,
        *,
        env: dict[str, str] | None = None,
        config: Path | None = None,
        netns: bool = True,
        wrap: Sequence[str] = (),
    ) -> Agent:
        agent = Agent(root, env=env, config=config, netns=netns, wrap=wrap)
        agents.append(agent)
        if ready:
            agent.wait_ready()
        return agent

    yield start
    for agent in agents:
        code = agent.stop()
        assert code in (0, 2), f"agent exited with {code}:\n{agent.output()}"
