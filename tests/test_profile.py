"""ProfileCallback: a jax.profiler trace of the asked-for steps, where xprof finds it."""

import glob
import os

import jax
import pytest
from conftest import loss_fn, make_batches, make_model, tx

import nnxloop as nl


def traced_steps(logdir):
    """The `step_num` of every "train" step annotation in the run's trace, and its files."""
    files = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    steps = set()
    for path in files:
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name == "train":
                        steps.update(int(v) for k, v in event.stats if k == "step_num")
    return steps, files


@pytest.mark.parametrize("k", [1, 4])
def test_the_trace_holds_the_asked_steps_annotated(k, tmp_path):
    logdir = tmp_path / "logs"
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        steps_per_dispatch=k,
        callbacks=[nl.ProfileCallback(logdir, start_step=5, num_steps=3)],
        progress=False,
    )
    trainer.fit(make_batches(), max_steps=16)
    steps, files = traced_steps(logdir)
    assert len(files) == 1, files
    if k == 1:
        assert steps == {5, 6, 7}  # one annotation per step
    else:
        assert steps == {5}  # the one dispatch (steps 5-8) that holds steps 5 to 7
    assert trainer.step == 16


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="num_steps"):
        nl.ProfileCallback("logs", num_steps=0)


def test_a_profile_placed_before_the_checkpoint_callback_decides_after_the_resume(tmp_path):
    def run(max_steps, logs):
        profile = nl.ProfileCallback(logs, start_step=1, num_steps=2)
        ckpt = nl.CheckpointCallback(tmp_path / "ckpt", every_steps=5)
        trainer = nl.Trainer(
            make_model(), tx(), loss_fn=loss_fn, callbacks=[profile, ckpt], progress=False
        )
        trainer.fit(make_batches(), max_steps=max_steps)

    run(5, tmp_path / "first")
    assert traced_steps(tmp_path / "first")[0] == {1, 2}
    # The rerun resumes at step 5, past the window: it traces nothing (not its restore as
    # "step 1").
    run(12, tmp_path / "second")
    assert traced_steps(tmp_path / "second")[0] == set()


def test_a_profile_to_a_url_is_refused():
    with pytest.raises(ValueError, match="local directory"):
        nl.ProfileCallback("gs://bucket/logs")
