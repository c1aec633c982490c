"""Multi-node behaviour on one machine: several raylets of ``ray.cluster_utils.Cluster``.

The scenario runs in its own Python process (never the shared ``ray_session`` instance): a head
without CPUs (it only holds the driver and the object store) and four worker raylets of one CPU
each. With ``actors.cpus_per_actor = 1`` the pool's two sampler actors and its reward actor must
land on three different worker nodes (node ids checked). Then the pool builds the pairs of six
backgrounds twice: undisturbed, and while the worker node of a sampler actor is removed after the
first commit; the restarted actor and the resubmitted calls must give exactly the same unique
pairs (content hashes) as the undisturbed run. The process sets ``RAY_TMPDIR`` to its own folder
(so ``/tmp/ray/ray_current_cluster`` is never written and no other Ray user connects to this
cluster), shuts the cluster down at the end, and the test then checks that no process of it is
left (and kills any by PID, by its temp-dir name).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .test_job_submit import _kill_pids_mentioning, _pids_mentioning

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _actor_nodes(actors: list) -> list[str]:
    """Node id of each actor handle, from the GCS actor table (no dashboard needed)."""
    import ray

    table = ray._private.state.actors()
    return [table[a._actor_id.hex()]["Address"]["NodeID"] for a in actors]


def scenario(out: str, workdir: str) -> None:
    """Runs in a subprocess; writes its observations to ``out`` (JSON)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster

    from actors.pool import CandidatePool
    from align_rl.alignment.candidates import background_order, make_tasks, valid_times
    from align_rl.io.pair_store import PairStore

    from tests.tiny_align import LAT, LON, tiny_world

    res: dict = {}
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False,
                                      # notice a removed node within ~2 s
                                      "_system_config": {"health_check_period_ms": 500,
                                                         "health_check_failure_threshold": 3}})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(4)]
        cluster.wait_for_nodes()
        cluster.connect()
        res["head"] = cluster.head_node.node_id
        res["workers"] = [w.node_id for w in workers]
        wd = Path(workdir)
        cfg, ws, models, truth, bg, _ = tiny_world(wd, ["actors.samplers=2", "actors.rewarders=1",
                                                        "actors.cpus_per_actor=1", "actors.max_restarts=3",
                                                        "actors.max_task_retries=1", "actors.batch_size=1"])
        times = valid_times(truth.times, bg.times, "2004-01-01", "2004-12-31", cfg.rewards.forecast_hours)
        ids = background_order(len(times), cfg.run.seed)[:6]
        tasks = make_tasks(ids, times, truth, bg, models.normalizer, cfg.rewards.forecast_hours)
        shape = models.codec.latent_shape
        pool = CandidatePool(cfg, models, LAT, LON)
        ray.get([a.info.remote() for a in pool.samplers + pool.rewarders])  # all placed
        res["sampler_nodes"] = _actor_nodes(pool.samplers)
        res["rewarder_nodes"] = _actor_nodes(pool.rewarders)

        ref = PairStore.open(wd / "undisturbed.zarr", shape, cfg.rewards.names)
        res["undisturbed"] = pool.build(tasks, ref, ["M", "P"], progress=False)

        store = PairStore.open(wd / "node_removed.zarr", shape, cfg.rewards.names)
        victim_id = res["sampler_nodes"][0]
        victim = next(w for w in workers if w.node_id == victim_id)
        removed: list[float] = []

        def remove_once(_out: dict) -> None:
            if not removed:
                cluster.remove_node(victim, allow_graceful=False)
                removed.append(time.time())

        res["disturbed"] = pool.build(tasks, store, ["M", "P"], progress=False, on_commit=remove_once)
        res["removed"] = bool(removed)
        t0 = time.time()
        while time.time() - t0 < 60:
            res["alive_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            if victim_id not in res["alive_nodes"]:
                break
            time.sleep(0.5)
        ray.get(pool.samplers[0].info.remote())  # the restarted actor answers
        res["sampler_nodes_after"] = _actor_nodes(pool.samplers)
        for name, st in (("undisturbed", ref), ("node_removed", store)):
            res[f"{name}_hashes"] = {m: sorted(bytes(h).hex() for h in st.pair_set(m).hash) for m in ("M", "P")}
            res[f"{name}_pairs"] = st.num_pairs
        pool.shutdown()
    finally:
        print(json.dumps({k: v for k, v in res.items() if "hashes" not in k}, default=str, indent=1))
        Path(out).write_text(json.dumps(res, default=str))
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    tmp = tempfile.mkdtemp(prefix="arlmn", dir="/tmp")  # short: raylet socket paths
    out = Path(tmp) / "result.json"
    workdir = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # raylets on loopback
    code = f"from tests.test_multinode import scenario; scenario({str(out)!r}, {str(workdir)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    finally:
        _kill_pids_mentioning(tmp)  # anything of this cluster still alive
    text = log.decode(errors="replace")
    assert out.exists(), f"scenario wrote nothing (rc {proc.returncode}):\n{text[-6000:]}"
    res = json.loads(out.read_text())
    res["returncode"], res["log"], res["tmp"] = proc.returncode, text, tmp
    yield res
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def test_scenario_ran_and_left_no_ray_running(multinode):
    assert multinode["returncode"] == 0, multinode["log"][-6000:]
    assert _pids_mentioning(multinode["tmp"]) == []


def test_actors_spread_over_worker_nodes(multinode):
    nodes = multinode["sampler_nodes"] + multinode["rewarder_nodes"]
    assert len(nodes) == 3
    assert len(set(nodes)) == 3  # one CPU per raylet, one CPU per actor: one actor per node
    assert set(nodes) <= set(multinode["workers"])
    assert multinode["head"] not in nodes  # the head has no CPU for actors


def test_removing_a_worker_node_loses_no_pair(multinode):
    assert multinode["removed"]
    victim = multinode["sampler_nodes"][0]
    assert victim not in multinode["alive_nodes"]
    # the sampler came back on a surviving node
    assert multinode["sampler_nodes_after"][0] in multinode["alive_nodes"]
    assert multinode["undisturbed"]["backgrounds"] == 6 and multinode["undisturbed"]["pairs"] > 0
    assert multinode["disturbed"]["backgrounds"] == 6
    # the node goes after the first commit, with work still in flight or queued on it; that work
    # is redone either by Ray (actor restart + task retry) or by the pool's resubmission, which of
    # the two depends on timing, so only the undisturbed run's counter is fixed
    assert multinode["undisturbed"]["resubmitted"] == 0
    assert multinode["node_removed_pairs"] == multinode["undisturbed_pairs"]
    for m in ("M", "P"):
        assert multinode["node_removed_hashes"][m] == multinode["undisturbed_hashes"][m]
        assert len(set(multinode["node_removed_hashes"][m])) == len(multinode["node_removed_hashes"][m])
