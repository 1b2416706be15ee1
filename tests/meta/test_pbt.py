"""The self-training population (Metz et al. 2021, arXiv:2101.07367): exploit copies without
aliasing, explore's probabilities, a resume that continues identically, the command line, and
(slow) the same run with real estimators in this process and on Ray actors."""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learnopt.cli import build_parser
from learnopt.meta.pbt import Population, PopulationRun, explore, kept_thetas
from learnopt.meta.pbt_config import PBTConfig
from learnopt.meta.pbt_workers import LocalHosts

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

TOY = dict(population=4, task="quadratic_d10", num_tasks=2, horizon=16, trunc_lengths=(4, 8),
           trunc_scale=1.0, exploit_every=2, eval_tasks=1, eval_steps=8, eval_seeds=1,
           outer_steps=8, checkpoint_every=3, keep_theta_every=4, final_eval=False, seed=5)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def same(a, b):
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


class FakeHosts:
    """Hosts without compiled estimators: the meta-loss of a theta is 0.5 ||theta - 0.1||^2,
    its estimate the exact gradient plus noise from (member, step, inner-state counter); the
    counter is the member's "inner state" that a checkpoint must carry."""

    def __init__(self, config):
        self.config = config
        self.state = {}
        self.resets = []

    def reset(self, member, theta, trunc, generation):
        self.resets.append((member, trunc, generation))
        self.state[member] = {"count": np.zeros((), np.int32), "trunc": np.asarray(trunc)}

    def set_state(self, member, theta, trunc, saved):
        self.state[member] = {k: np.asarray(v) for k, v in saved.items()}

    def get_states(self):
        return {m: {k: v.copy() for k, v in s.items()} for m, s in self.state.items()}

    @staticmethod
    def loss(theta):
        return 0.5 * sum(float(np.sum((x - 0.1) ** 2)) for x in leaves(theta))

    def estimate(self, step, thetas):
        out = {}
        for m, theta in enumerate(thetas):
            count = int(self.state[m]["count"])
            rng = np.random.default_rng([m, step, count])
            grad = jax.tree_util.tree_map(
                lambda x, r=rng: np.asarray(x) - 0.1 + 0.01 * r.standard_normal(np.shape(x)),
                theta)
            self.state[m]["count"] = np.asarray(count + 1, np.int32)
            out[m] = {"meta_loss": self.loss(theta), "grad": grad, "metrics": {}}
        return out

    def evaluate(self, thetas, seeds):
        return [self.loss(t) for t in thetas]

    def close(self):
        pass


def toy(**changes):
    return PBTConfig(**{**TOY, **changes})


# -- explore -----------------------------------------------------------------------------------


@pytest.mark.parametrize("outer", ["learned", "adam"])
def test_explore_probabilities_over_many_events(outer):
    """20,000 draws with a fixed seed: switch 0.5 and resample 0.1 within 4 standard errors;
    a switch always picks a different member (or rate), uniformly; truncations from the set."""
    config = toy(outer=outer, population=5)
    rng = np.random.default_rng(1234)
    n, switches, resamples, targets = 20_000, 0, 0, []
    for _ in range(n):
        out = explore(rng, config, member=0, pointer=2, lr=config.adam_lrs[1], trunc=4)
        switches += out["switch"]
        resamples += out["resample"]
        if out["switch"]:
            targets.append(out["pointer"] if outer == "learned" else out["lr"])
            assert targets[-1] != (2 if outer == "learned" else config.adam_lrs[1])
        else:
            assert out["pointer"] == 2 and out["lr"] == config.adam_lrs[1]
        if out["resample"]:
            assert out["trunc"] in config.truncations()
        else:
            assert out["trunc"] == 4
    assert abs(switches / n - 0.5) < 4 * np.sqrt(0.25 / n)
    assert abs(resamples / n - 0.1) < 4 * np.sqrt(0.09 / n)
    _, counts = np.unique(targets, return_counts=True)
    k = len(counts)
    assert k == (4 if outer == "learned" else len(config.adam_lrs) - 1)
    expected = len(targets) / k
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected))


@pytest.mark.parametrize("outer", ["learned", "adam"])
def test_event_probabilities_in_the_population_log(outer):
    """1,500 exploit events of a population: the fraction followed by a switch and by a
    truncation resample matches 0.5 and 0.1 (4 standard errors, fixed seed); a switch always
    changes the outer optimizer (member, or Adam rate)."""
    config = toy(population=3, exploit_every=1, outer=outer)
    pop = Population(config, FakeHosts(config))
    pop.init()
    n, records = 1500, []
    for step in range(1, n + 1):
        pop.step = step
        records += pop.exploit()
    kinds = [r.get("kind") for r in records if r["event"] == "explore"]
    assert sum(r["event"] == "exploit" for r in records) == n
    assert abs(kinds.count("switch_outer") / n - 0.5) < 4 * np.sqrt(0.25 / n)
    assert abs(kinds.count("resample_trunc") / n - 0.1) < 4 * np.sqrt(0.09 / n)
    for r in records:
        if r.get("kind") == "switch_outer":
            assert r["from"] != r["to"]
            if outer == "adam":
                assert r["to"] in config.adam_lrs and r["from"] in config.adam_lrs


# -- exploit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("outer", ["learned", "adam"])
def test_exploit_copies_theta_and_outer_state_without_aliasing(outer):
    config = toy(outer=outer, p_switch=0.0, p_resample=0.0)
    hosts = FakeHosts(config)
    pop = Population(config, hosts)
    pop.init()
    for _ in range(3):  # some outer-optimizer history before the copy
        pop.step_once()
    pop.step = 2 * config.exploit_every  # an event step (no event ran in step_once above)
    (event,) = pop.exploit()
    w, loser = event["winner"], event["loser"]
    a, b = pop.learners[w], pop.learners[loser]
    assert same(a.theta, b.theta) and same(a.opt_state, b.opt_state)
    assert pop.pointer[loser] == pop.pointer[w] and pop.trunc[loser] == pop.trunc[w]
    if outer == "adam":
        assert pop.lr(loser) == pop.lr(w)
    for x, y in zip(jax.tree_util.tree_leaves((a.theta, a.opt_state)),
                    jax.tree_util.tree_leaves((b.theta, b.opt_state)), strict=True):
        assert x is not y
        assert not np.shares_memory(np.asarray(x), np.asarray(y))
    assert hosts.resets[-1][0] == loser  # the loser's inner runs restart
    # Independent afterwards: a step with different noise moves the two apart.
    pop.step_once()
    assert not same(pop.learners[w].theta, pop.learners[loser].theta)


def test_the_better_member_wins():
    config = toy()
    pop = Population(config, FakeHosts(config))
    pop.init()
    for step in range(2, 40, 2):
        pop.step = step
        event = pop.exploit()[0]
        s = dict(zip(event["members"], event["scores"], strict=True))
        assert s[event["winner"]] <= s[event["loser"]]


# -- resume ------------------------------------------------------------------------------------


def _logs(out):
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in metrics:
        r.pop("seconds")
        r.pop("estimate_seconds")
    events = (out / "events.jsonl").read_text()
    return metrics, events


def _assert_same_runs(whole, parts, config):
    final_a = kept_thetas(whole, config)[-1]
    final_b = kept_thetas(parts, config)[-1]
    assert final_a[0] == final_b[0] == config.outer_steps
    for x, y in zip(final_a[1], final_b[1], strict=True):
        assert same(x, y)
    assert _logs(whole) == _logs(parts)


@pytest.mark.parametrize("outer", ["learned", "adam"])
def test_resume_continues_identically(tmp_path, outer):
    """N steps in one go == k steps, checkpoint, resume in a new process state, N-k steps:
    the same thetas, outer states, metrics and event log."""
    config = toy(outer=outer, outer_steps=10)
    PopulationRun(config, tmp_path / "whole").run(FakeHosts(config), progress=False)
    short = toy(outer=outer, outer_steps=5)  # 5: past a checkpoint (3) and mid-interval
    PopulationRun(short, tmp_path / "parts").run(FakeHosts(short), progress=False)
    # Lines written past the last checkpoint by a killed run are dropped on resume.
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "members": []}\n{"step": 1')
    PopulationRun(config, tmp_path / "parts").run(FakeHosts(config), progress=False)
    _assert_same_runs(tmp_path / "whole", tmp_path / "parts", config)
    events = _logs(tmp_path / "whole")[1].splitlines()
    assert sum('"exploit"' in e for e in events) == config.outer_steps // config.exploit_every


def test_a_checkpoint_of_the_old_accumulator_layout_is_refused(tmp_path):
    from learnopt.io import CheckpointError, checkpoint_bytes, load_checkpoint

    config = toy(outer_steps=3)
    PopulationRun(config, tmp_path / "run").run(FakeHosts(config), progress=False)
    path = tmp_path / "run" / "checkpoint.msgpack"
    ckpt = load_checkpoint(path)
    assert ckpt.state["accumulator_layout"] == 2
    old = {k: v for k, v in ckpt.state.items() if k != "accumulator_layout"}
    path.write_bytes(checkpoint_bytes(old, ckpt.config))
    longer = toy(outer_steps=5)
    with pytest.raises(CheckpointError, match="accumulator layout 0.*cannot be resumed"):
        PopulationRun(longer, tmp_path / "run").run(FakeHosts(longer), progress=False)


def test_a_changed_config_is_refused_before_writing(tmp_path):
    config = toy(outer_steps=2)
    PopulationRun(config, tmp_path / "run").run(FakeHosts(config), progress=False)
    with pytest.raises(ValueError, match="different config"):
        PopulationRun(toy(outer_steps=2, p_switch=0.3), tmp_path / "run")
    PopulationRun(toy(outer_steps=4), tmp_path / "run")  # a budget change is fine


# -- config and command line -------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="population"):
        toy(population=1)
    with pytest.raises(ValueError, match="p_switch"):
        toy(p_switch=1.5)
    with pytest.raises(ValueError, match="outer"):
        toy(outer="sgd")
    with pytest.raises(ValueError, match="unknown pbt config"):
        PBTConfig.from_dict({"populaton": 3})
    assert PBTConfig().truncations() == (20, 30, 40, 80)
    assert toy(trunc_scale=0.5, trunc_lengths=(200, 300, 400, 800)).truncations() == (
        16, 16, 16, 16)  # capped at the horizon


@pytest.mark.parametrize("name", ["pbt_self_training.toml", "pbt_adam_outer.toml"])
def test_shipped_configs_load(name):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    config = PBTConfig.from_file(os.path.join(root, name))
    assert config.population == 10 and config.truncations() == (20, 30, 40, 80)
    assert config.outer == ("learned" if "self" in name else "adam")


def _parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices["pbt"]


def test_every_option_has_help():
    _, p = _parser()
    for action in p._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_bad_input_fails_before_anything_is_written(tmp_path):
    parser, _ = _parser()
    bad = tmp_path / "bad.toml"
    bad.write_text("population = 1\n")
    out = tmp_path / "run"
    for argv in (["pbt", "--config", str(bad), "--out", str(out)],
                 ["pbt", "--config", str(tmp_path / "missing.toml"), "--out", str(out)],
                 ["pbt", "--out", str(out)],
                 ["pbt", "--config", str(bad), "--out", str(out), "--workers", "-1"]):
        args = parser.parse_args(argv)
        with pytest.raises((ValueError, FileNotFoundError)):
            args.fn(args)
        assert not out.exists()


# -- real estimators (slow: compiles) ----------------------------------------------------------


@pytest.mark.slow
def test_real_estimators_resume_identically(tmp_path):
    config = toy(outer_steps=6, population=3)
    hosts = LocalHosts(config)  # shared: its compiled estimators serve every run below
    PopulationRun(config, tmp_path / "whole").run(hosts, progress=False)
    short = toy(outer_steps=4, population=3)
    PopulationRun(short, tmp_path / "parts").run(hosts, progress=False)
    PopulationRun(config, tmp_path / "parts").run(hosts, progress=False)
    _assert_same_runs(tmp_path / "whole", tmp_path / "parts", config)


@pytest.mark.slow
def test_ray_hosts_give_the_in_process_run(tmp_path):
    pytest.importorskip("ray")
    from learnopt.meta.pbt_workers import RayHosts

    config = toy(outer_steps=4, population=3)
    PopulationRun(config, tmp_path / "local").run(LocalHosts(config), progress=False)
    hosts = RayHosts(config, workers=2)
    try:
        PopulationRun(config, tmp_path / "ray").run(hosts, progress=False)
    finally:
        hosts.close()
    _assert_same_runs(tmp_path / "local", tmp_path / "ray", config)


def test_learned_outer_step_uses_the_pointer_theta_of_the_step_start():
    """Member m's update uses its pointer's theta from before this step's updates."""
    config = toy(population=2, outer_steps=1)
    hosts = FakeHosts(config)
    pop = Population(config, hosts)
    pop.init()
    pop.pointer = [1, 0]
    before = [jax.tree_util.tree_map(jnp.array, t) for t in pop.thetas]
    results = hosts.estimate(0, before)
    hosts.reset(0, None, 4, 0)
    hosts.reset(1, None, 4, 0)
    pop.step_once()
    for m in range(2):
        want, _ = pop.learner.apply(
            pop.learner.init(before[m]), results[m]["grad"], loss=results[m]["meta_loss"],
            outer_theta=before[1 - m])
        assert same(want.theta, pop.learners[m].theta)
