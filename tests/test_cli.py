import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import loss_fn, make_batches, make_model, subprocess_env, tx

import nnxloop as nl
from nnxloop import cli

HERE = os.path.dirname(os.path.abspath(__file__))
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
SIZE = r"\d+(\.\d)? (B|KiB|MiB)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short fit writing periodic checkpoints (steps 4, 8, 12) and the best two by val_loss."""
    root = tmp_path_factory.mktemp("run")
    best = nl.BestModelCallback(root / "best", monitor="val_loss", max_to_keep=2)
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(root / "ckpt", every_steps=4), best],
        progress=False,
    )
    trainer.fit(make_batches(), val_data=make_batches(2, seed=1), max_steps=12, eval_every_steps=4)
    return root, dict(best.kept), best.best_step


def inspect(capsys, *args):
    code = cli.main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def rows(out):
    """`{step: [row lines]}` of the listing table (lines after the header)."""
    table = out.splitlines()[2:]
    found = {}
    for line in table:
        found.setdefault(int(line.split()[0]), []).append(line)
    return found


def test_lists_every_step_with_time_and_size(run, capsys):
    root, _, _ = run
    code, out, err = inspect(capsys, root / "ckpt")
    assert code == 0 and err == ""
    assert out.splitlines()[1].split() == ["STEP", "TIME", "SIZE", "METRICS", "BEST", "STATUS"]
    listed = rows(out)
    assert sorted(listed) == [4, 8, 12]
    for (line,) in listed.values():
        assert re.search(rf"^\s*\d+\s+{ISO_TIME}\s+{SIZE}\s+-\s+complete$", line), line
        assert "*" not in line  # periodic checkpoints rank nothing


def test_marks_the_best_step_with_its_metric(run, capsys):
    root, kept, best_step = run
    code, out, _ = inspect(capsys, root / "best")
    assert code == 0
    listed = rows(out)
    assert sorted(listed) == sorted(kept)
    for step, (line,) in listed.items():
        assert f"val_loss={kept[step]:.6g}" in line
        assert (" * " in line) == (step == best_step), line


def test_lists_interrupted_and_set_aside_saves(run, capsys, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(run[0] / "ckpt", directory)
    (directory / "9.orbax-checkpoint-tmp-123").mkdir()
    os.rename(directory / "8", directory / "8.unreadable-1700000000")
    code, out, _ = inspect(capsys, directory)
    assert code == 0
    listed = rows(out)
    assert sorted(listed) == [4, 8, 9, 12]
    assert listed[9][0].endswith("incomplete (9.orbax-checkpoint-tmp-123)")
    assert re.search(rf"\s{SIZE}\s", listed[8][0]) and "unreadable (8.unreadable-" in listed[8][0]
    assert "2 complete of 4" in out.splitlines()[0]
    # Inspecting must never clean up what it reports.
    assert (directory / "9.orbax-checkpoint-tmp-123").is_dir()


def test_damaged_meta_is_listed_as_unreadable(run, capsys, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(run[0] / "ckpt", directory)
    for root, _, names in os.walk(directory / "12" / "meta"):
        for name in names:
            if name != "commit_success.txt":
                with open(os.path.join(root, name), "w") as f:
                    f.write("{not json")
    code, out, _ = inspect(capsys, directory)
    assert code == 0
    assert "unreadable (JSONDecodeError" in rows(out)[12][0]
    code, out, err = inspect(capsys, directory, "--step", 12)
    assert code == 2 and out == ""
    assert err.startswith("nnxloop inspect: Checkpoint step 12 in ") and "unreadable" in err


def test_step_shows_array_tree_and_meta(run, capsys):
    root, _, _ = run
    code, out, err = inspect(capsys, root / "ckpt", "--step", 8)
    assert code == 0 and err == ""
    arrays, meta_text = out.split("\nmeta:\n")
    kernel = next(line for line in arrays.splitlines() if line.startswith("['l1']['kernel']"))
    assert kernel.split()[1:4] == ["(6,", "16)", "float32"]
    assert "mesh(data=4)" in kernel  # the sharding the four-device run saved with
    assert "\nmodel: 10 arrays" in arrays and "\noptimizer: " in arrays
    assert "['opt_state']['0']['mu']['l1']['kernel']" in arrays
    meta = json.loads(meta_text)
    assert (meta["step"], meta["device_count"]) == (8, 4)
    assert any(k.startswith("BestModelCallback(") for k in meta["callbacks"])
    assert "data_state" in meta
    assert "model_shapes" not in meta


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "is not a checkpoint directory (it has no step directories)"),
        ("parent", "these subdirectories hold checkpoints: best, ckpt"),
        ("file", "is a file, not a checkpoint directory"),
        ("step", "No complete checkpoint of step 5 in "),
        ("incomplete", "(9.orbax-checkpoint-tmp-1 is incomplete); it has steps 4, 8, 12."),
    ],
)
def test_errors_are_one_line_and_exit_2(run, capsys, tmp_path, case, message):
    root = run[0]
    args = {
        "missing": [tmp_path / "nowhere"],
        "empty": [tmp_path],
        "parent": [root],
        "file": [tmp_path / "notes.txt"],
        "step": [root / "ckpt", "--step", 5],
        "incomplete": [tmp_path / "ckpt", "--step", 9],
    }[case]
    (tmp_path / "notes.txt").write_text("hello")
    if case == "incomplete":
        shutil.copytree(root / "ckpt", tmp_path / "ckpt")
        (tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1").mkdir()
    code, out, err = inspect(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("nnxloop inspect: ") and err.count("\n") == 1
    assert message in err


def test_human_size():
    assert [cli.human_size(n) for n in (0, 1023, 1536, 5 * 2**20)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
    ]


@pytest.mark.slow
def test_command_reads_a_checkpoint_of_another_device_count(run):
    # The checkpoint was written with four devices; this process has one.
    root, _, best_step = run
    env = subprocess_env()
    command = ["-m", "nnxloop.cli", "inspect", str(root / "best"), "--step", str(best_step)]
    proc = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['l2']['kernel']['value']" in proc.stdout and "(16, 3)" in proc.stdout
    assert '"best": {' in proc.stdout


def _damage(directory, step, how):
    """Leaves `step` as orbax's background delete or a truncating disk can: `how` is
    "half-deleted" (the model item gone, the rest still there) or "truncated" (every array data
    file of the model cut short, the metadata intact)."""
    if how == "half-deleted":
        shutil.rmtree(directory / str(step) / "model")
        return
    for root, _, names in os.walk(directory / str(step) / "model"):
        if os.path.basename(root) == "d":
            for name in names:
                os.truncate(os.path.join(root, name), 10)


def test_half_deleted_step_is_listed_as_unreadable(run, capsys, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(run[0] / "ckpt", directory)
    _damage(directory, 12, "half-deleted")
    code, out, _ = inspect(capsys, directory)
    assert code == 0
    listed = rows(out)
    assert listed[12][0].endswith("unreadable (the model item is missing)"), listed[12][0]
    assert [listed[s][0].split()[-1] for s in (4, 8)] == ["complete", "complete"]
    assert "2 complete of 3" in out.splitlines()[0]


def test_verify_reads_every_array_and_names_the_damaged_step(run, capsys, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(run[0] / "ckpt", directory)
    code, out, _ = inspect(capsys, directory, "--verify")
    assert code == 0
    assert "3 complete of 3" in out.splitlines()[0] and "every array read" in out.splitlines()[0]
    _damage(directory, 8, "truncated")
    code, out, _ = inspect(capsys, directory)
    assert code == 0 and "3 complete of 3" in out.splitlines()[0]  # metadata alone looks fine
    code, out, err = inspect(capsys, directory, "--verify")
    assert code == 1, "a damaged step found by --verify makes the command fail"
    listed = rows(out)
    assert re.search(r"unreadable \(the model arrays do not read: \w+", listed[8][0]), listed[8][0]
    assert [listed[s][0].split()[-1] for s in (4, 12)] == ["complete", "complete"]
    assert "step 8" in err and "--verify" in err


def test_verify_reads_steps_in_a_directory_with_url_characters(tmp_path, capsys):
    directory = tmp_path / "run #3 50%?" / "ckpt"
    trainer = nl.Trainer(
        make_model(),
        tx(),
        loss_fn=loss_fn,
        callbacks=[nl.CheckpointCallback(directory, every_steps=2)],
        progress=False,
    )
    trainer.fit(make_batches(4), max_steps=4)
    assert cli.main(["inspect", str(directory), "--verify"]) == 0
    assert "2 complete of 2" in capsys.readouterr().out
