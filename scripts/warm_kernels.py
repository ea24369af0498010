"""Compile the numba kernels into their on-disk cache with one small FedQSN round.

scripts/test runs this before pytest: otherwise every process the tests start
at once (pytest workers, Ray actors, SuperNodes' ClientApps) compiles the same
kernels itself before any of them has written the cache.
"""

import tempfile

from flwr.supercore.task_identity import TaskIdentity

from fedqsn_flwr.experiments.inprocess import run_in_process

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
with tempfile.TemporaryDirectory() as out:
    run_in_process(
        {
            "output-dir": out,
            "num-server-rounds": 1,
            "pretrain-epochs": 1,
            "local-epochs": 1,
            "min-nodes": 2,
            "fraction-evaluate": 1.0,
            "hidden-feedback": True,
        },
        num_nodes=2,
    )
