"""The benchmarks' own bookkeeping (timers, step splits, summaries); no model is trained here.

    python3 -m pytest -q benchmarks/test_benchmarks.py
"""

import argparse
import statistics
import time

import pytest
from common import SectionTimer, as_argv, parse_settings
from constructors import measurement_pairs, score, sft_plan
from learning import merge_runs, same_setup, summarize
from memory import summarize as summarize_memory
from overhead import section_name, split_step
from parity import max_abs_diffs


class Work:
    def outer(self, timer_sleep, inner_sleep):
        time.sleep(timer_sleep)
        self.inner(inner_sleep)

    def inner(self, seconds):
        time.sleep(seconds)


def test_section_timer_charges_nested_time_to_the_nested_path_only():
    timer = SectionTimer()
    with timer.patch([(Work, "outer"), (Work, "inner"), (Work, "missing")]):
        Work().outer(0.05, 0.10)
    assert Work.outer.__name__ == "outer" and not hasattr(Work.outer, "__wrapped__")  # restored on exit
    totals = timer.snapshot()
    assert set(totals) == {("outer",), ("outer", "inner")}
    assert totals[("outer",)] == pytest.approx(0.05, abs=0.04)
    assert totals[("outer", "inner")] == pytest.approx(0.10, abs=0.04)


def test_section_names_follow_the_outermost_meaning():
    assert section_name(("training_step", "_generate_and_score_completions", "_generate_single_turn")) == \
        "rollout generation: generate"
    # The synthesis goes through the same generation method, but inside the construction.
    assert section_name(("training_step", "_generate_and_score_completions", "_attach_constructions",
                         "_self_generate", "_generate_single_turn")) == "construction: synthesis generation"
    assert section_name(("training_step", "_generate_and_score_completions", "_attach_constructions",
                         "_calculate_rewards")) == "construction: re-verification"
    assert section_name(("training_step", "compute_loss", "_ref_loss", "_get_per_token_logps_and_entropies")) == \
        "loss + backward: L_ref forward"
    assert section_name(("training_step", "backward")) == "loss + backward: backward"
    # L_GRPO's backward before L_ref's forward runs inside compute_loss: still a backward.
    assert section_name(("training_step", "compute_loss", "backward")) == "loss + backward: backward"


def test_split_step_puts_untimed_time_under_optimizer():
    step = {"wall_s": 10.0, "sections": {("training_step", "_generate_and_score_completions", "_generate_single_turn"): 6.0,
                                        ("training_step", "backward"): 2.5, ("training_step",): 0.5}}
    split = split_step(step)
    assert split == {"rollout generation: generate": 6.0, "loss + backward: backward": 2.5,
                     "other: training_step rest": 0.5, "other: optimizer step + callbacks": 1.0}


def test_max_abs_diffs_per_metric_nan_equal_on_both_sides():
    a = [{"loss": 0.5, "reward": 0.25, "entropy": float("nan")}, {"loss": 0.1, "reward": 1.0}]
    b = [{"loss": 0.5, "reward": 0.75, "entropy": float("nan")}, {"loss": 0.4, "reward": 1.0}]
    assert max_abs_diffs(a, b) == pytest.approx({"loss": 0.3, "reward": 0.5})


def test_summary_pairs_differences_by_seed():
    def run(greedy, sampled):
        return {"curve": [{"step": 0, "greedy": 0.1, "avg@k": 0.1}, {"step": 4, "greedy": greedy, "avg@k": sampled}]}

    runs = {"grpo": {0: run(0.2, 0.1), 1: run(0.4, 0.3)}, "tapo": {0: run(0.3, 0.2), 1: run(0.4, 0.5)}}
    summary = summarize(runs)
    assert summary["grpo"]["greedy"] == pytest.approx((0.3, 0.1414213), abs=1e-6)  # stdev of [0.2, 0.4]
    # Paired: tapo - grpo = [+0.1, 0.0] greedy and [+0.1, +0.2] avg@k.
    assert summary["tapo"]["greedy - grpo"] == pytest.approx((0.05, 0.0707107), abs=1e-6)
    assert summary["tapo"]["avg@k - grpo"] == pytest.approx((0.15, 0.0707107), abs=1e-6)
    assert "greedy - grpo" not in summary["grpo"] and summary["tapo"]["final_step"] == 4


def test_results_of_other_seeds_and_processes_are_kept():
    spec = {"train": {"max_steps": 8}, "k": 2, "seeds": [0]}
    assert same_setup({**spec, "seeds": [1, 2]}, spec)  # more seeds: same experiment, resume
    assert not same_setup({**spec, "k": 4}, spec) and not same_setup(None, spec)
    assert not same_setup({**spec, "train": {"max_steps": 4}}, spec)
    mine = {"grpo": {1: "mine"}, "tapo": {}}
    merge_runs(mine, {"runs": {"grpo": {"0": "saved", "1": "stale"}, "opsd": {"2": "other process"}}})
    assert mine == {"grpo": {0: "saved", 1: "mine"}, "tapo": {}, "opsd": {2: "other process"}}


def test_settings_round_trip_to_cli_arguments():
    assert as_argv({"n_pos": 1, "ots_enabled": False}) == ["--n_pos", "1", "--ots_enabled", "false"]
    assert parse_settings(["lr_scheduler_type=constant", "x=a=b"]) == {"lr_scheduler_type": "constant", "x": "a=b"}
    with pytest.raises(SystemExit, match="key=value"):
        parse_settings(["oops"])


def test_testbed_arms_are_named_by_their_tapo_train_options():
    from testbed import arm_settings, job_id, parse_job_id

    assert arm_settings("grpo") == {"algorithm": "grpo"}
    assert arm_settings("tapo:ref_baseline=union,ots_enabled=false") == {
        "algorithm": "tapo", "ref_baseline": "union", "ots_enabled": "false"}
    with pytest.raises(SystemExit, match="not key=value"):
        arm_settings("tapo:oops")
    assert parse_job_id(job_id("tapo:constructor=self", 0.001, 3)) == ("tapo:constructor=self", 0.001, 3)


def test_testbed_area_under_curve_is_the_mean_accuracy_over_training():
    from testbed import area_under_curve

    points = [{"step": 0, "greedy": 0.2}, {"step": 10, "greedy": 0.4}, {"step": 30, "greedy": 0.4}]
    # Trapezoids: 10 * 0.3 + 20 * 0.4 = 11, over 30 steps.
    assert area_under_curve(points) == pytest.approx(11 / 30)
    assert area_under_curve([{"step": 0, "greedy": 0.5}]) == 0.5


def test_testbed_value_at_interpolates_between_evaluations_and_holds_the_ends():
    from testbed import value_at

    points = [{"train_s": 0.0, "avg@k": 0.2}, {"train_s": 10.0, "avg@k": 0.4}, {"train_s": 30.0, "avg@k": 0.3}]
    assert value_at(points, "train_s", 5.0, "avg@k") == pytest.approx(0.3)
    assert value_at(points, "train_s", 20.0, "avg@k") == pytest.approx(0.35)
    assert value_at(points, "train_s", 99.0, "avg@k") == pytest.approx(0.3)  # stopped earlier: its last value


def test_testbed_bootstrap_interval():
    from testbed import bootstrap_ci

    assert bootstrap_ci([0.1]) is None
    assert bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    low, high = bootstrap_ci([0.0, 0.1, 0.2, 0.3])
    assert 0.0 <= low < 0.15 < high <= 0.3  # the mean 0.15 lies inside, the interval within the data's range
    assert bootstrap_ci([0.0, 0.1, 0.2, 0.3]) == (low, high)  # seeded


def _job(arm, seed, greedy, lr=1e-3, auc=None):
    auc = greedy if auc is None else auc
    seconds = 20.0 if arm.startswith("tapo") else 10.0
    curve = [{"train_s": 0.0, "avg@k": 0.0}, {"train_s": seconds, "avg@k": greedy}]
    return {"arm": arm, "lr": lr, "seed": seed, "auc": {"avg@k": auc, "greedy": auc}, "step_s": 1.0, "tokens": 100,
            "curve": curve,
            "final": {"greedy": greedy, "avg@k": greedy, "dsr": greedy, "err": None}}


def test_testbed_summary_pairs_by_seed_and_says_whether_the_interval_excludes_zero():
    from testbed import summarize

    spec = {"seeds": [0, 1, 2], "ablation_seeds": [0], "default_lr": 1e-3}
    jobs = {i: j for i, j in enumerate([
        _job("grpo", 0, 0.2), _job("grpo", 1, 0.3), _job("grpo", 2, 0.4),
        _job("tapo", 0, 0.3), _job("tapo", 1, 0.4), _job("tapo", 2, 0.5),  # +0.1 on every seed
        _job("tapo:ots_enabled=false", 0, 0.1),  # one seed: no interval
        _job("tapo", 100, 0.9), _job("grpo", 1, 0.9, lr=3e-3),  # sweep seed, other learning rate: not counted
    ])}
    summary = summarize(jobs, {}, spec)
    diff = summary["tapo"]["final_greedy - grpo"]
    assert diff["mean"] == pytest.approx(0.1) and diff["n"] == 3 and diff["excludes_0"]
    assert diff["ci95"] == pytest.approx((0.1, 0.1))
    assert summary["grpo"]["final_greedy"] == pytest.approx(0.3) and "final_greedy - grpo" not in summary["grpo"]
    ablation = summary["tapo:ots_enabled=false"]["final_greedy - grpo"]
    assert ablation["mean"] == pytest.approx(-0.1) and ablation["ci95"] is None and not ablation["excludes_0"]
    assert summary["tapo"]["final_err"] is None and "final_err - grpo" not in summary["tapo"]
    assert summary["tapo"]["auc_avg@k - grpo"]["mean"] == pytest.approx(0.1)
    # tapo took twice GRPO's time (20 s vs 10 s): at GRPO's 10 s it stood halfway between its start and its end
    equal_time = summary["tapo"]["avg@k at grpo's wall-clock - grpo"]
    assert equal_time["mean"] == pytest.approx(statistics.fmean([0.15 - 0.2, 0.2 - 0.3, 0.25 - 0.4]))


def test_testbed_learning_rate_is_the_best_mean_auc_on_the_sweep_seeds():
    from testbed import chosen_learning_rates

    spec = {"sweep_seeds": [100, 101], "learning_rates": [1e-3, 3e-3]}
    jobs = {i: j for i, j in enumerate([
        _job("grpo", 100, 0, lr=1e-3, auc=0.5), _job("grpo", 101, 0, lr=1e-3, auc=0.1),
        _job("grpo", 100, 0, lr=3e-3, auc=0.3), _job("grpo", 101, 0, lr=3e-3, auc=0.4),
        _job("grpo", 0, 0, lr=1e-3, auc=0.9),  # an evaluation seed: not part of the choice
        _job("tapo", 100, 0, lr=1e-3, auc=0.5),  # sweep incomplete: no choice
    ])}
    assert chosen_learning_rates(jobs, spec, ["grpo", "tapo"]) == {"grpo": 3e-3}


def test_testbed_variants_of_tapo_inherit_its_swept_learning_rate():
    from testbed import arm_learning_rate

    lrs = {"grpo": 1e-4, "tapo": 3e-4, "tapo:constructor=self": 1e-3}
    assert arm_learning_rate("tapo:constructor=self", lrs, 5e-3) == 1e-3  # swept itself
    assert arm_learning_rate("tapo:ots_enabled=false", lrs, 5e-3) == 3e-4  # a variant of tapo: tapo's rate
    assert arm_learning_rate("opsd", lrs, 5e-3) == 5e-3  # not swept, varies nothing swept: the middle rate
    assert arm_learning_rate("tapo:cut=after_error", {}, 5e-3) == 5e-3


def test_testbed_results_of_more_seeds_and_arms_are_the_same_experiment():
    from testbed import same_experiment

    spec = {"task": "arith", "steps": 200, "seeds": [0], "arms": ["grpo"], "ablation_seeds": [0]}
    assert same_experiment({**spec, "seeds": [0, 1], "arms": ["grpo", "tapo"]}, spec)
    assert not same_experiment({**spec, "steps": 100}, spec) and not same_experiment(None, spec)


def test_testbed_results_of_another_experiment_are_kept_aside_not_overwritten(tmp_path):
    import json

    from testbed import Results

    spec = {"task": "arith", "steps": 200, "seeds": [0], "arms": ["grpo"], "ablation_seeds": [0]}
    path = tmp_path / "testbed.json"
    Results(path, spec).update(jobs={"grpo@1e-4#0": {"final": 0.4}})
    Results(path, {**spec, "seeds": [1]}).update(jobs={"grpo@1e-4#1": {"final": 0.5}})  # the same experiment: merged
    assert set(json.loads(path.read_text())["jobs"]) == {"grpo@1e-4#0", "grpo@1e-4#1"}
    other = {**spec, "steps": 100}  # e.g. another policy or size
    merged = Results(path, other).update(jobs={"grpo@1e-4#0": {"final": 0.1}})
    assert merged["spec"] == other and merged["jobs"] == {"grpo@1e-4#0": {"final": 0.1}}
    kept = list(tmp_path.glob("testbed.before-*.json"))
    assert len(kept) == 1 and set(json.loads(kept[0].read_text())["jobs"]) == {"grpo@1e-4#0", "grpo@1e-4#1"}


def test_testbed_other_sweep_rates_are_another_experiment():
    from testbed import same_experiment, size_spec

    args = argparse.Namespace(size="default", set=[], steps=None, n_eval=None, k=None,
                              eval_every=None, seeds=None, ablation_seeds=None, arms=["opsd"],
                              learning_rates=[3e-6, 1e-5])
    spec = size_spec(args)
    assert spec["learning_rates"] == [3e-6, 1e-5] and spec["default_lr"] == 1e-5 and spec["arms"] == ["opsd"]
    assert not same_experiment(size_spec(argparse.Namespace(**{**vars(args), "learning_rates": None})), spec)


def test_peak_rss_sees_a_freed_allocation_until_reset():
    import torch
    from common import peak_rss_gib, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs")
    before = peak_rss_gib()
    block = torch.ones(2**26)  # 256 MiB, written so it is resident
    del block
    assert peak_rss_gib() - before >= 0.2
    reset_peak_rss()
    assert peak_rss_gib() - before < 0.2


def test_rss_tracer_puts_the_peak_on_the_phase_that_reached_it():
    import sys

    import torch
    from common import RssTracer, StepClock

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/self/statm is Linux")

    class Phases:
        def small(self):
            time.sleep(0.05)

        def big(self):
            block = torch.ones(2**26)  # 256 MiB, resident while this phase runs
            time.sleep(0.1)
            del block

    timer, clock = SectionTimer(), StepClock()
    with timer.patch([(Phases, "small"), (Phases, "big")]), RssTracer(timer, clock, every_s=0.005) as tracer:
        Phases().small()
        Phases().big()
        clock.steps.append({})  # step 1 ends
        Phases().small()
    peaks = tracer.summary()
    assert (peaks[0]["step"], peaks[0]["phase"]) == (1, "big")
    small = {p["step"]: p["peak_rss_gib"] for p in peaks if p["phase"] == "small"}
    assert set(small) == {1, 2} and peaks[0]["peak_rss_gib"] - small[1] >= 0.2


def test_memory_summary_pairs_rounds_and_takes_the_highest_peak():
    def run(peak, *steps):
        return {"peak_rss_gib": peak, "step_s": list(steps)}

    runs = {"tapo": {"new": [run(3.1, 10, 12), run(3.3, 9, 11)], "old": [run(4.0, 10, 10), run(3.9, 20, 20)]},
            "opsd": {"new": [run(3.6, 30)]}}
    summary = summarize_memory(runs)
    tapo = summary["tapo"]
    assert tapo["new"] == {"peak_rss_gib": 3.3, "median_step_s": 10.5}
    assert tapo["old"]["peak_rss_gib"] == 4.0
    assert tapo["step_time_ratio_new_old_per_round"] == [1.1, 0.5]  # mean new / mean old, round by round
    assert tapo["step_time_ratio_new_old_median"] == pytest.approx(0.8)
    assert "step_time_ratio_new_old_median" not in summary["opsd"]  # no old variant: no ratio


# ---------------------------------------------------------------------------------------------------------------------
# constructors.py --coldstart


WRONG = "Step 1: 23 + 45 = 68\nStep 2: 68 - 12 = 66\nThe answer is \\boxed{66}"
RIGHT = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"


def test_measurement_pairs_take_more_rows_until_enough_pairs():
    row = {"problem": "23 + 45 - 12", "answer": "56", "attempts": [RIGHT, WRONG, WRONG, " "]}
    # Each row gives 2 pairs (its blank attempt is left out); 1 row asked, 3 pairs wanted -> 2 rows measured.
    requests, used = measurement_pairs([row, row, row], measure=1, min_pairs=3, n_pos=1, n_neg=2, seed=0)
    assert used == 2 and len(requests) == 4 and {r.wrong for r in requests} == {WRONG}
    assert requests[0].problem.startswith("23 + 45 - 12\n\nPlease reason step by step")


def test_score_counts_each_outcome_once():
    requests, _ = measurement_pairs([{"problem": "p", "answer": "56", "attempts": [RIGHT, WRONG, WRONG]}], 1, 1, 1, 2, 0)
    good = ("<analysis>step 2</analysis><reconstruction>Step 1: 23 + 45 = 68\nWait, 68 - 12 = 56.\n"
            "The answer is \\boxed{56}</reconstruction>")
    wrong_answer = good.replace("56}", "57}")
    counts = score(requests * 2, [good, wrong_answer, "no tags", good.replace("Wait", "So")])
    assert counts == {"pairs": 4, "parsed": 3, "assembled": 2, "accepted": 1, "parse_rate": 0.75, "assembly_rate": 0.5,
                      "accept_rate": 0.25, "rejected": {"unparsed": 1, "no_reflection": 1, "wrong_answer": 1}}


def test_sft_plan_picks_the_faster_probe_and_fits_the_budget():
    args = argparse.Namespace(lora_r="auto", epochs=2.0, sft_batch_size=4, sft_budget_s=600)
    probe = {"full": {"seconds_per_step": 20.0}, "lora_r16": {"seconds_per_step": 12.0}}
    assert sft_plan(probe, args, 200) == (16, 1.0)  # 50 steps per epoch x 12 s = 600 s
    assert sft_plan({**probe, "full": {"seconds_per_step": 6.0}}, args, 200) == (0, 2.0)  # 2 epochs fit
    args.lora_r = "0"
    assert sft_plan(None, args, 200) == (0, 2.0)
