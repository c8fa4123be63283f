"""Warm Ray workers (`controller.init_local_ray(warm=True)`, `controller._plain_trial_actors`): a local sweep's
prestarted worker processes import ray.tune, torch and the trainer once they have connected, the sweep's Tune
trial actors start in them, and a Ray started without warm=True imports nothing ahead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


RAY = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from ray import tune
    from moelab.platform.controller import _plain_trial_actors, init_local_ray
    init_local_ray(num_cpus=2, warm=sys.argv[1] == "1")  # two prestarted workers: a Tune trial, a probe
    time.sleep(float(sys.argv[2]))

    def trial(config):  # what a sweep's Tune trial finds when it starts
        tune.report({"torch": "torch" in sys.modules, "loop": "moelab.trainers.loop" in sys.modules})

    def tune_run(plain):
        with _plain_trial_actors(plain) as took:
            grid = tune.Tuner(tune.with_resources(trial, {"CPU": 1}),
                              run_config=tune.RunConfig(storage_path=sys.argv[3], name=f"plain{plain}",
                                                        verbose=0)).fit()
        return {"took": took, **{k: bool(v) for k, v in grid[0].metrics.items() if k in ("torch", "loop")}}

    out = {"tune_plain": tune_run(True)}

    @ray.remote(num_cpus=1)
    class Probe:
        def modules(self):
            return {m: m in sys.modules for m in ("torch", "ray.tune", "moelab.trainers.loop", "torch._dynamo")}

        def gc_state(self):  # the warm-up's imports were frozen, and the collector is on again
            import gc

            return {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count() > 0}

        def threads(self):  # what a trial runs with: one torch thread per CPU Ray gave it, warm or not
            import torch

            from moelab.platform.worker import _threads_from_env

            _threads_from_env()
            return torch.get_num_threads()

    probe = Probe.remote()
    out["probe"] = ray.get(probe.modules.remote())
    out["gc"] = ray.get(probe.gc_state.remote())
    out["threads"] = ray.get(probe.threads.remote())
    ray.kill(probe)
    logs = ray._private.worker._global_node.get_logs_dir_path()

    def fresh():  # worker processes Ray started for this job (its id in the log name), not prestarted ones
        return len([f for f in os.listdir(logs) if f.startswith("worker-") and "-01000000-" in f
                    and f.endswith(".err")])

    out["fresh_before"] = fresh()
    out["tune_runtime_env"] = tune_run(False)["took"]  # Tune's own actor class (with a runtime_env)
    out["fresh_after"] = fresh()
    ray.shutdown()
    print(json.dumps(out))
""")


def test_a_local_sweeps_trials_start_in_warm_workers(tmp_path):
    """On a warm local Ray the first Tune trial (with `_plain_trial_actors`, as `run_sweep` runs it) and the
    first plain actor start in Ray's prestarted workers and find ray.tune, torch and the trainer imported,
    even when they arrive at once (they wait for the imports there); Tune's own actor class (with its
    runtime_env) needs a fresh process; a Ray started without warm=True imports nothing ahead."""
    script = tmp_path / "probe_ray.py"
    script.write_text(RAY)
    run = [sys.executable, str(script)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    warm = json.loads(subprocess.run([*run, "1", "0", str(tmp_path / "w")], env=env, capture_output=True, text=True,
                                     check=True, timeout=300).stdout.strip().splitlines()[-1])
    assert warm["threads"] == 1
    assert warm["tune_plain"] == {"took": True, "torch": True, "loop": True}
    # the probe actor runs in the second prestarted worker, warm as well; torch._dynamo stays unloaded
    assert warm["probe"] == {"torch": True, "ray.tune": True, "moelab.trainers.loop": True, "torch._dynamo": False}
    assert warm["gc"] == {"enabled": True, "frozen": True}  # moelab.platform.warm: moelab.startup
    # trial and probe: prestarted workers, though asked for at once (0 s) and the trial's placement group holds
    # the CPU it takes (Ray would kill an idle worker beyond the free CPUs: WARM_IDLE_KEEP_MS)
    assert warm["fresh_before"] == 0
    assert warm["tune_runtime_env"] is False and warm["fresh_after"] == 1
    cold = json.loads(subprocess.run([*run, "0", "0", str(tmp_path / "c")], env=env, capture_output=True, text=True,
                                     check=True, timeout=300).stdout.strip().splitlines()[-1])
    assert cold["tune_plain"] == {"took": True, "torch": False, "loop": False}
    assert cold["probe"]["torch"] is False and cold["probe"]["moelab.trainers.loop"] is False
    assert cold["gc"] == {"enabled": True, "frozen": False}
