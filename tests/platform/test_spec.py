import textwrap

import pytest

from moelab.platform.spec import (SpecError, catalogue_path, expand, format_trials, list_catalogue, load_spec,
                                  parse_spec)
from moelab.trainers.config import load_run_config

BASE = {
    "name": "t",
    "common": {"train.steps": 20, "data.source": "synthetic"},
    "baselines": [{"preset": "tiny"}],
    "base": {"preset": "moe-tiny", "upcycle_from": "tiny"},
    "axes": {"upcycle.noise_std": [0.0, 1e-3], "upcycle.reset_ratio": [0.0, 0.05, 0.5]},
    "seeds": [0, 1],
}


def spec(**changes):
    d = {**BASE, **changes}
    return parse_spec({k: v for k, v in d.items() if v is not None})


def write(tmp_path, text):
    p = tmp_path / "sweep.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_expansion_counts_and_order():
    trials = expand(spec())
    dense = [t for t in trials if t.family == "dense"]
    moe = [t for t in trials if t.family == "moe"]
    assert len(dense) == 2 and len(moe) == 2 * 3 * 2
    assert {(t.axes["upcycle.noise_std"], t.axes["upcycle.reset_ratio"], t.seed) for t in moe} == {
        (n, r, s) for n in (0.0, 1e-3) for r in (0.0, 0.05, 0.5) for s in (0, 1)}
    # one axis of two values x two seeds = 4 grid trials, plus the baseline per seed
    one = expand(spec(axes={"upcycle.noise_std": [0.0, 1e-3]}))
    assert len(one) == 4 + 2
    # a trial's dependency always comes before it
    seen = set()
    for t in trials:
        assert t.depends_on is None or t.depends_on in seen
        seen.add(t.trial_id)


def test_seeds_and_upcycle_dependencies():
    trials = expand(spec())
    base = {t.seed: t.trial_id for t in trials if t.family == "dense"}
    for t in trials:
        assert t.config.train.seed == t.seed
        if t.family == "moe":
            assert t.depends_on == base[t.seed] and t.upcycle_from == "tiny"
            assert t.config.upcycle.source == ""  # filled by the controller from the baseline's checkpoint
    # a baseline run with one seed serves every seed of the grid
    trials = expand(spec(baselines=[{"preset": "tiny", "seeds": [7]}]))
    (b,) = [t for t in trials if t.family == "dense"]
    assert b.seed == 7 and all(t.depends_on == b.trial_id for t in trials if t.family == "moe")


def test_trial_ids_deterministic_and_config_sensitive():
    a = [t.trial_id for t in expand(spec())]
    assert a == [t.trial_id for t in expand(spec())]
    assert len(set(a)) == len(a)
    # the same values spelled differently give the same ids; axes in another order the same hashes
    other = expand(spec(axes={"upcycle.noise_std": [0, "1e-3"], "upcycle.reset_ratio": ["0", "0.05", 0.5]}))
    assert [t.trial_id for t in other] == a
    other = expand(spec(axes={"upcycle.reset_ratio": [0.0, 0.05, 0.5], "upcycle.noise_std": [0.0, 0.001]}))
    assert sorted(t.trial_id[-6:] for t in other) == sorted(i[-6:] for i in a)
    # a change of the shared config changes every id; a change to the baseline changes its dependents too
    b = [t.trial_id for t in expand(spec(common={"train.steps": 21, "data.source": "synthetic"}))]
    assert not set(a) & set(b)
    c = expand(spec(baselines=[{"preset": "tiny", "overrides": {"optim.lr": 1e-3}}]))
    assert not set(a) & {t.trial_id for t in c}
    # readable: the axis values and the seed are in the id
    t = next(t for t in expand(spec()) if t.family == "moe" and t.axes["upcycle.noise_std"] == 1e-3)
    assert t.trial_id.startswith("moe-noise_std0p001-reset_ratio") and f"-s{t.seed}-" in t.trial_id


def test_trial_config_rebuilds_from_preset_and_overrides():
    for t in expand(spec()):
        assert load_run_config(t.preset, t.overrides) == t.config
        row = t.row()
        assert row["params_active"] == t.config.model.param_counts()["active"]
        assert row["upcycle.noise_std"] == t.config.upcycle.noise_std and row["seed"] == t.seed


def test_linked_axis_moves_keys_together():
    trials = [t for t in expand(load_spec("granularity")) if t.family == "moe"]
    by_label = {t.axes["granularity"]: t for t in trials if t.seed == 0}
    assert set(by_label) == {"G1", "G2", "G4", "G8"}
    for label, t in by_label.items():
        g = int(label[1:])
        m = t.config.model.moe
        assert (m.granularity, m.n_experts, m.top_k) == (g, 4 * g, g)
        assert t.row()["granularity"] == label
    # constant active and total expert parameters along the axis (only the router grows, E x d_model)
    counts = [t.config.model.param_counts() for t in by_label.values()]
    assert len({c["routed_active"] for c in counts}) == 1 and len({c["routed_experts"] for c in counts}) == 1


def test_linked_axis_with_trial_keys():
    s = spec(baselines=[{"preset": "ladder-2"}, {"preset": "ladder-3"}],
             base={"preset": "ladder-2", "overrides": {"model.moe.n_experts": 8, "model.moe.granularity": 2}},
             axes={"size": {"s2": {"preset": "ladder-2", "upcycle_from": "ladder-2"},
                            "s3": {"preset": "ladder-3", "upcycle_from": "ladder-3"}}})
    moe = [t for t in expand(s) if t.family == "moe"]
    assert {(t.preset, t.upcycle_from) for t in moe} == {("ladder-2", "ladder-2"), ("ladder-3", "ladder-3")}


def test_nested_overrides_are_flattened():
    a = expand(spec(common={"train": {"steps": 20}, "data": {"source": "synthetic"}}))
    assert [t.trial_id for t in a] == [t.trial_id for t in expand(spec())]


def test_yaml_file_and_floats(tmp_path):
    p = write(tmp_path, """
        name: y
        base: {preset: moe-tiny}
        axes:
          upcycle.noise_std: [0, 1e-6, 1.0e-2]
        seeds: [3]
    """)
    trials = expand(load_spec(p))
    assert [t.config.upcycle.noise_std for t in trials] == [0.0, 1e-6, 1e-2]
    assert all(t.depends_on is None and t.family == "moe" for t in trials)


BAD = {
    "unknown top-level key": ("""
        name: x
        base: {preset: tiny}
        seedz: [0]
    """, ["seedz", "allowed", "seeds"]),
    "unknown nested key": ("""
        name: x
        base: {preset: tiny}
        resources: {workers: 1, gpu: 1}
    """, ["resources", "gpu", "gpus_per_worker"]),
    "unknown config key in an axis": ("""
        name: x
        base: {preset: moe-tiny}
        axes: {model.moe.topk: [1, 2]}
    """, ["model.moe.topk", "top_k"]),
    "unknown config key in common": ("""
        name: x
        base: {preset: tiny}
        common: {train.stepz: 3}
    """, ["common", "train.stepz", "steps"]),
    "wrong type (seeds)": ("""
        name: x
        base: {preset: tiny}
        seeds: [zero]
    """, ["seeds", "zero"]),
    "wrong type (resources.workers)": ("""
        name: x
        base: {preset: tiny}
        resources: {workers: two}
    """, ["resources.workers", "two"]),
    "wrong type (axes not a list)": ("""
        name: x
        base: {preset: tiny}
        axes: {optim.lr: 0.1}
    """, ["optim.lr", "non-empty list"]),
    "empty axis": ("""
        name: x
        base: {preset: tiny}
        axes: {optim.lr: []}
    """, ["axes", "optim.lr", "empty"]),
    "empty linked axis": ("""
        name: x
        base: {preset: tiny}
        axes: {granularity: {}}
    """, ["granularity", "empty"]),
    "ep does not divide experts": ("""
        name: x
        base: {preset: moe-tiny}
        resources: {workers: 3, ep: 3}
    """, ["resources.ep", "3", "model.moe.n_experts=8", "[1]"]),
    "ep does not divide workers": ("""
        name: x
        base: {preset: moe-tiny}
        resources: {workers: 2, ep: 4}
    """, ["ep", "4", "resources.workers=2"]),
    "bad value for a config key": ("""
        name: x
        base: {preset: moe-tiny}
        axes: {model.moe.top_k: [2, many]}
    """, ["model.moe.top_k", "many", "an integer", "trial"]),
    "out-of-range value names allowed values": ("""
        name: x
        base: {preset: moe-tiny}
        axes: {model.moe.top_k: [2, 9]}
    """, ["model.moe.top_k", "9", "1..model.moe.n_experts=8"]),
    "bad literal": ("""
        name: x
        base: {preset: tiny}
        common: {optim.schedule: linear}
    """, ["optim.schedule", "linear", "'cosine'"]),
    "unknown preset": ("""
        name: x
        base: {preset: huge}
    """, ["preset", "huge", "moe-tiny"]),
    "upcycle_from an unknown baseline": ("""
        name: x
        baselines: [{preset: tiny}]
        base: {preset: moe-tiny, upcycle_from: small}
    """, ["upcycle_from", "small", "tiny"]),
    "upcycle_from a baseline of another shape": ("""
        name: x
        baselines: [{preset: ladder-3}]
        base: {preset: moe-tiny, upcycle_from: ladder-3}
    """, ["upcycle_from", "ladder-3", "model.d_model"]),
    "MoE baseline": ("""
        name: x
        baselines: [{preset: moe-tiny}]
    """, ["baselines[0]", "model.moe.n_experts", "dense"]),
    "seed set in an axis": ("""
        name: x
        base: {preset: tiny}
        axes: {train.seed: [1, 2]}
    """, ["train.seed", "seeds"]),
    "one key in two axes": ("""
        name: x
        base: {preset: moe-tiny}
        axes:
          model.moe.top_k: [1, 2]
          g: {a: {model.moe.top_k: 1}}
    """, ["model.moe.top_k", "axis"]),
    "bad sweep name": ("""
        name: no spaces please
        base: {preset: tiny}
    """, ["name", "no spaces please"]),
    "duplicate trials": ("""
        name: x
        base: {preset: tiny}
        axes: {optim.lr: [0.001, 1e-3]}
    """, ["same config"]),
    "not a mapping": ("""
        - name: x
    """, ["mapping"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_fail_naming_the_key(tmp_path, case):
    text, needles = BAD[case]
    with pytest.raises(SpecError) as e:
        expand(load_spec(write(tmp_path, text)))
    for needle in needles:
        assert needle in str(e.value), f"{needle!r} not in: {e.value}"


def test_missing_file_and_catalogue_names(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="noise"):
        load_spec("no-such-sweep")
    assert catalogue_path("noise").name == "noise.yaml"


EXPECTED = {"noise", "reset", "granularity", "expert-ratio", "scaling", "expert-lr", "dense-ladder", "leverage-demo",
            "efficiency-leverage", "balancing", "mtp"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalogue_expands(name):
    s = load_spec(name)
    assert s.name == name
    trials = expand(s)
    assert trials and len({t.trial_id for t in trials}) == len(trials)
    table = format_trials(trials)
    assert all(t.trial_id in table for t in trials)


def test_catalogue_is_complete():
    assert EXPECTED <= set(list_catalogue())


def test_catalogue_axes():
    def values(name, key):
        return sorted({t.axes[key] for t in expand(load_spec(name)) if key in t.axes})

    assert values("noise", "upcycle.noise_std") == [0.0, 1e-6, 1e-3, 1e-2]
    assert values("reset", "upcycle.reset_ratio") == [0.0, 0.05, 0.5]
    assert values("scaling", "upcycle.scaling") == ["none", "nvidia"]
    assert values("expert-lr", "optim.expert_lr_fraction") == [0.3, 1.0]
    ladder = expand(load_spec("dense-ladder"))
    assert [t.preset for t in ladder] == ["ladder-2", "ladder-3", "ladder-4", "ladder-6", "ladder-8"]
    ratio = {t.config.model.moe.n_experts // t.config.model.moe.top_k for t in expand(load_spec("expert-ratio"))
             if t.family == "moe"}
    assert ratio == {4, 8, 16, 32}


def test_balancing_sweep_arms():
    trials = expand(load_spec("balancing"))
    assert sorted(t.family for t in trials) == ["dense"] * 2 + ["moe"] * 6
    arms = {}
    for t in trials:
        if t.family == "moe":
            m = t.config.model.moe
            assert (m.score_func, m.renormalize, m.z_loss_coef) == ("sigmoid", True, 0.0)  # only balancing varies
            arms.setdefault(t.axes["balancing"], set()).add(
                (m.aux_loss_coef > 0, m.bias_update_rate > 0, m.seq_aux_loss_coef > 0))
    assert arms == {"switch-aux": {(True, False, False)}, "aux-free-bias": {(False, True, False)},
                    "bias-seq-aux": {(False, True, True)}}
    assert {t.seed for t in trials} == {0, 1}


def test_mtp_sweep_arms_and_equal_flop_baselines():
    trials = expand(load_spec("mtp"))
    grid = {t.axes["model.mtp_depth"]: t for t in trials if t.seed == 0 and t.axes}
    assert sorted(grid) == [0, 1, 2] and {t.family for t in trials} == {"dense"}
    assert {t.config.model.mtp_depth for t in grid.values()} == {0, 1, 2}
    assert len({t.steps for t in grid.values()}) == 1  # the grid compares depths at equal steps
    # each baseline trains depth 0 for (within 1%) the training FLOPs of the depth it is named after
    base = {t.name: t for t in trials if t.seed == 0 and not t.axes}
    for depth in (1, 2):
        b = base[f"tiny-flops-mtp{depth}"]
        assert b.config.model.mtp_depth == 0
        assert b.tokens * b.flops_per_token == pytest.approx(grid[depth].tokens * grid[depth].flops_per_token,
                                                              rel=0.01)
    assert {t.seed for t in trials} == {0, 1, 2}


def test_leverage_demo_is_small_and_complete():
    trials = expand(load_spec("leverage-demo"))
    dense = [t for t in trials if t.family == "dense"]
    moe = [t for t in trials if t.family == "moe"]
    assert len({t.params_total for t in dense}) >= 3
    assert {t.config.model.moe.n_experts // t.config.model.moe.top_k for t in moe} == {4, 8}
    assert {t.upcycle_from for t in moe} == {None, "d32"}
    assert {t.seed for t in moe} == set(range(8))  # seed noise with 7 degrees of freedom per family
    # every upcycled trial starts from the dense d32 run of its own seed (its noise is the seed's, not shared)
    d32 = {t.trial_id: t.seed for t in dense if t.name == "d32"}
    assert all(d32[t.depends_on] == t.seed for t in moe if t.upcycle_from)
    # the dense law sees both of its axes: 4 sizes x 3 budgets
    assert len({(t.params_total, t.config.train.steps) for t in dense}) == 12
    assert all(t.config.data.source == "synthetic" for t in trials)
    # Budget: ~17 TFLOPs trained in ~600 CPU-seconds at these sizes (the file's header); make demo must stay
    # under 12 minutes on 2 cores with the install, so the training keeps under about half of that.
    assert sum(t.flops for t in trials) < 2e13


def test_efficiency_leverage_sweep_varies_a_g_and_c():
    from moelab.ablations.el_law import activation_ratio, granularity_paper

    moe = [t for t in expand(load_spec("efficiency-leverage")) if t.family == "moe"]
    designs = {(activation_ratio(t.config.model), granularity_paper(t.config.model)) for t in moe}
    assert {a for a, _ in designs} == {0.5, 0.25, 0.125} and len({g for _, g in designs}) == 3 and len(designs) == 9
    assert {t.preset for t in moe} == {"ladder-2", "ladder-3"}  # two sizes: two budgets per design
    # at 1 CPU per trial under an hour on a laptop: ~1 ms of 1 CPU per 1e10 FLOPs at these sizes
    assert sum(t.flops for t in expand(load_spec("efficiency-leverage"))) < 5e13


def test_format_trials():
    out = format_trials(expand(spec()))
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["trial_id", "family", "seed", "axes"]
    assert "14 trials (2 dense, 12 moe)" in lines[-1]


def test_trial_sizes_leave_out_the_mtp_modules_but_not_their_flops():
    from moelab.trainers.config import load_run_config

    trials = {t.config.model.mtp_depth: t for t in expand(load_spec("mtp")) if t.seed == 0 and t.axes}
    plain, mtp = trials[0], trials[2]
    assert (mtp.params_total, mtp.params_active, mtp.params_non_embedding) == \
        (plain.params_total, plain.params_active, plain.params_non_embedding)
    pc = load_run_config(mtp.preset, mtp.overrides).model.param_counts()
    assert pc["mtp"] > 0 and mtp.params_total == pc["total"] - pc["mtp"]
    assert mtp.flops_per_token > plain.flops_per_token  # the modules' compute is still counted
