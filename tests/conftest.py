import os
import sys

# Test helpers (e.g. tests/trainers/hf_configs.py) import by module name.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "trainers"))


import pytest  # noqa: E402

# Everything distributed in the tests stays on 127.0.0.1: gloo binds the loopback interface; Ray (set before
# anything imports ray) uses the loopback address for its node and workers and no auth token (Ray >= 2.59
# wants one for a local cluster otherwise). Set at import so that test modules importing ray see them too.
_LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
for _k, _v in _LOOPBACK_ENV.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session: 2 CPUs, on 127.0.0.1, no dashboard;
    ray is part of the dev extra. On 2 CPUs run Ray Train workers with resources_per_worker={"CPU": 0.5}."""
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
