from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Unpack

import pytest

from tests.conftest import require_root_and_tools
from tests.integration.harness import Agent, AgentOptions, StartAgent


@pytest.fixture(autouse=True)
def _needs_root_and_real_tools() -> None:
    require_root_and_tools("sshd", "unshare", "ssh-keygen", "nsenter")


@pytest.fixture
def start_agent() -> Iterator[StartAgent]:
    """start_agent(root) -> a running, ready Agent; every agent is stopped (and must exit 0) at teardown."""
    agents: list[Agent] = []

    def start(root: Path, ready: bool = True, **options: Unpack[AgentOptions]) -> Agent:
        agent = Agent(root, **options)
        agents.append(agent)
        if ready:
            agent.wait_ready()
        return agent

    yield start
    for agent in agents:
        code = agent.stop()
        assert code in (0, 2), f"agent exited with {code}:\n{agent.output()}"
