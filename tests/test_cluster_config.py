"""Cluster definitions: the launcher YAML against Ray's own schema, the resources the code asks
for against the node types, security settings, and the KubeRay RayJob manifest."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "a100.yaml"
RAYJOB = REPO / "cluster" / "rayjob.yaml"
PAPER_CFG = REPO / "cluster" / "paper_a100.yaml"


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ----------------------------------------------------------------------------- schema


def test_launcher_yaml_passes_rays_schema_as_written_and_after_defaults():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _launcher()
    jsonschema.validate(raw, _schema())  # the file itself
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks, with AWS defaults


def test_schema_check_catches_a_broken_launcher_yaml():
    """The check is not vacuous: typical mistakes fail it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _launcher()
    bad["available_node_types"]["ray.worker.a100"]["resources"]["GPU"] = "8"  # a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
    bad = _launcher()
    bad["max_wokers"] = 3  # unknown top-level key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
    bad = _launcher()
    bad["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


# ----------------------------------------------------------------------------- security


def _commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key, []))


def test_launcher_keeps_token_auth_and_a_private_dashboard():
    cfg = _launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    head = _commands(cfg, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    # the token comes from the user's secret file, never from this file
    text = LAUNCHER.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*\S", text)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert {".venv", ".git", "runs"} <= set(cfg["rsync_exclude"])


def test_launcher_installs_this_package_on_every_node():
    cfg = _launcher()
    setup = _commands(cfg, "setup_commands")
    mounted = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert mounted, "the repository must be synced to the nodes"
    assert re.search(r"pip install \S*" + re.escape(mounted[0].replace("~", "$HOME")), setup)
    assert "torch==2.13.0" in setup
    assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in cfg["available_node_types"].values())


# ----------------------------------------------------------------------------- resources


def _paper_cfg():
    from align_rl.config import load_config

    return load_config(PAPER_CFG)


def requested_bundles(cfg) -> dict[str, list[dict[str, float]]]:
    """The Ray resource bundles the code asks for, per phase, with the code's own option
    builders (actors, pretraining) and the learner's ScalingConfig rule (align_rl.alignment.learner.run_dpo:
    ``{"CPU": actors.cpus_per_actor, "GPU": 1 if dpo.use_gpu}`` per worker)."""
    from actors.sampler import actor_options as forecast_actor_options
    from actors.sampler import actor_options
    from align_rl.training.harness import scaling_config

    def bundle(opts: dict) -> dict[str, float]:
        return {"CPU": float(opts.get("num_cpus", 1.0)), "GPU": float(opts.get("num_gpus", 0.0))}

    a = cfg.actors
    actors = ([bundle(actor_options(cfg))] * (a.samplers + a.rewarders)
              + [bundle(forecast_actor_options(cfg))] * a.forecasters)
    sc = scaling_config(cfg.pretrain)
    pre = [{"CPU": float(sc.resources_per_worker.get("CPU", 1.0)),
            "GPU": float(sc.resources_per_worker.get("GPU", 0.0))}] * sc.num_workers
    learner = [{"CPU": float(a.cpus_per_actor), "GPU": 1.0 if cfg.dpo.use_gpu else 0.0}] * cfg.dpo.num_workers
    # pretraining runs alone; pair building and DPO (online mode) run side by side
    return {"pretrain": pre, "align": learner + actors}


def pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """First-fit-decreasing placement of resource bundles on nodes (free resources)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b["GPU"], b["CPU"]), reverse=True):
        for n in free:
            if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items()):
                for k, v in b.items():
                    n[k] = n.get(k, 0.0) - v
                break
        else:
            return False
    return True


def _launcher_worker_nodes(cfg: dict) -> list[dict[str, float]]:
    nodes = []
    for name, t in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        nodes += [{k: float(v) for k, v in t["resources"].items()}] * int(t.get("max_workers", 0))
    return nodes


def test_packing_rule_is_a_real_check():
    nodes = [{"CPU": 8.0, "GPU": 2.0}]
    assert pack([{"CPU": 4.0, "GPU": 1.0}] * 2, nodes)
    assert not pack([{"CPU": 4.0, "GPU": 1.0}] * 3, nodes)
    assert not pack([{"CPU": 9.0, "GPU": 0.0}], nodes)
    assert pack([{"CPU": 1.0, "GPU": 0.5}] * 4, nodes)


def test_paper_resources_fit_the_launcher_node_types():
    pytest.importorskip("actors.sampler")
    cfg = _paper_cfg()
    assert cfg.data.grid == "128x256" and cfg.dpo.use_gpu and cfg.pretrain.use_gpu
    assert cfg.actors.gpus_per_actor > 0
    launcher = _launcher()
    nodes = _launcher_worker_nodes(launcher)
    assert any(n["GPU"] >= 8 for n in nodes)
    for phase, bundles in requested_bundles(cfg).items():
        assert any(b["GPU"] > 0 for b in bundles), phase
        # every single request fits one worker node type, and the phase fits the full cluster
        for b in bundles:
            assert any(pack([b], [n]) for n in nodes), (phase, b)
        assert pack(bundles, nodes), f"{phase} needs more than the cluster's max size"
    # the head only runs drivers: no GPU requests go there
    head = launcher["available_node_types"][launcher["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0
    # a DDP learner of one GPU per worker must fit on ONE node for NCCL intra-node speed
    learner = [{"CPU": float(cfg.actors.cpus_per_actor), "GPU": 1.0}] * cfg.dpo.num_workers
    assert any(pack(learner, [n]) for n in nodes)


def test_run_workdir_is_on_shared_storage_in_both_cluster_definitions():
    cfg = _paper_cfg()
    wd = cfg.run.workdir
    assert wd.startswith("/mnt/align-rl/")
    assert "/mnt/align-rl" in _commands(_launcher(), "setup_commands")
    spec = _rayjob()["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert "/mnt/align-rl" in mounts


# ----------------------------------------------------------------------------- RayJob


def test_rayjob_manifest_runs_the_main_job_on_gpu_workers_with_auth():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "align_rl.train"]
    assert entry[entry.index("--config") + 1].endswith("cluster/paper_a100.yaml")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"] == "2.60.0"
    head_c = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert str(rc["headGroupSpec"]["rayStartParams"].get("num-gpus")) == "0"
    groups = rc["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups
    containers = [head_c, spec["submitterPodTemplate"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in groups]
    images = {c["image"] for c in containers}
    assert len(images) == 1 and not next(iter(images)).endswith(":latest")
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"]  # from a Secret
        assert "value" not in env["RAY_AUTH_TOKEN"]
    # the paper resources fit the GPU worker group at its maximum size
    pytest.importorskip("actors.sampler")
    nodes = []
    for g in gpu_groups:
        lim = g["template"]["spec"]["containers"][0]["resources"]["requests"]
        node = {"CPU": float(lim["cpu"]), "GPU": float(lim["nvidia.com/gpu"])}
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        nodes += [node] * int(g["maxReplicas"])
    for phase, bundles in requested_bundles(_paper_cfg()).items():
        assert pack(bundles, nodes), phase
