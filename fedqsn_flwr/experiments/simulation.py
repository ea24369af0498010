"""Run one federation in Flower's simulation engine from Python."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedqsn_flwr.app.apps import make_client_app, make_server_app
from fedqsn_flwr.app.config import output_root, resolve
from fedqsn_flwr.app.results import run_name
from fedqsn_flwr.app.sources import data_key, needs_hub


def simulate(
    overrides: Mapping[str, Any],
    num_nodes: int = 10,
    project_dir: Path | None = None,
    cpus_per_node: float = 1.0,
) -> Path:
    """Run a federation of ``num_nodes`` virtual SuperNodes; return its output folder.

    ``overrides`` are config keys (as in ``--run-config``); ``project_dir`` is where
    presets are looked up (default: the current directory). Raises whatever the
    ServerApp raised, e.g. :class:`~fedqsn_flwr.app.config.ConfigError`.
    """
    from flwr.simulation import run_simulation

    project_dir = project_dir or Path.cwd()
    config = resolve({}, project_dir, overrides)
    if not needs_hub(data_key(config)):
        # nothing to download: make sure the datasets library does not try
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    overrides = {**overrides, "run-name": run_name(config)}
    run_simulation(
        make_server_app(project_dir, overrides),
        make_client_app(project_dir, overrides),
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0}},
    )
    return output_root(config) / str(overrides["run-name"])
