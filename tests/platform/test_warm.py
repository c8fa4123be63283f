"""Warm Ray workers (`moelab/platform/warm/sitecustomize.py`, `controller.init_local_ray`): a local sweep's
prestarted worker processes import torch and the trainer before the first Tune trial lands on them, and
nothing else that starts Python with that environment is affected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from moelab.platform.controller import WARM_DIR


def _python(code: str, env: dict[str, str], argv0: str | None = None) -> dict:
    """Run `code` in a fresh interpreter (optionally as a script named argv0) and return its JSON output."""
    full = {**os.environ, **env}
    if argv0 is None:
        out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    else:
        with open(argv0, "w") as f:
            f.write(code)
        out = subprocess.run([sys.executable, argv0], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = textwrap.dedent("""
    import json, os, sys
    print(json.dumps({"torch": "torch" in sys.modules, "loop": "moelab.trainers.loop" in sys.modules,
                      "chained": os.environ.get("OTHER_SITECUSTOMIZE_RAN") == "1" or "other_site" in sys.modules}))
""")


def test_only_a_ray_worker_warms_up_and_another_sitecustomize_still_runs(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    # a sitecustomize later on the path (a distribution's own, say): ours must not hide it
    (other / "sitecustomize.py").write_text("import sys, types\nsys.modules['other_site'] = types.ModuleType('x')\n")
    env = {"PYTHONPATH": os.pathsep.join([WARM_DIR, str(other)]), "MOELAB_WARM_WORKERS": "1"}
    plain = _python(PROBE, env)
    assert plain == {"torch": False, "loop": False, "chained": True}
    worker = _python(PROBE, env, argv0=str(tmp_path / "default_worker.py"))
    assert worker == {"torch": True, "loop": True, "chained": True}
    off = _python(PROBE, {**env, "MOELAB_WARM_WORKERS": "0"}, argv0=str(tmp_path / "default_worker.py"))
    assert off == {"torch": False, "loop": False, "chained": True}


RAY = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from moelab.platform.controller import init_local_ray
    init_local_ray(num_cpus=1, warm=sys.argv[1] == "1")
    env_clean = "MOELAB_WARM_WORKERS" not in os.environ
    time.sleep(float(sys.argv[2]))  # the prestarted worker finishes its imports while the driver waits

    @ray.remote(num_cpus=1)
    class Probe:
        def modules(self):
            return {m: m in sys.modules for m in ("torch._dynamo", "ray.tune", "moelab.trainers.loop")}

        def threads(self):  # what a trial runs with: one torch thread per CPU Ray gave it, warm or not
            import torch

            from moelab.platform.worker import _threads_from_env

            _threads_from_env()
            return torch.get_num_threads()

    probe = Probe.remote()
    got = ray.get(probe.modules.remote())
    got["threads"] = ray.get(probe.threads.remote())
    ray.shutdown()
    print(json.dumps({"env_clean": env_clean, **got}))
""")


def test_a_local_rays_first_actor_finds_the_trainer_imported(tmp_path):
    script = tmp_path / "probe_ray.py"
    script.write_text(RAY)
    run = [sys.executable, str(script)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    warm = json.loads(subprocess.run([*run, "1", "10"], env=env, capture_output=True, text=True, check=True,
                                     timeout=240).stdout.strip().splitlines()[-1])
    assert warm == {"env_clean": True, "torch._dynamo": True, "ray.tune": True, "moelab.trainers.loop": True,
                    "threads": 1}
    cold = json.loads(subprocess.run([*run, "0", "0"], env=env, capture_output=True, text=True, check=True,
                                     timeout=240).stdout.strip().splitlines()[-1])
    assert cold["torch._dynamo"] is False and cold["moelab.trainers.loop"] is False
