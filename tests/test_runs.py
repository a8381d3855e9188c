"""Resuming a run that was killed while it saved a checkpoint (esmloc.runs.plan_resume, for train.py and
esmloc-pretrain): the last whole checkpoint is resumed, the partial one is removed. test_pretrain's
test_killed_run_resumes_... kills a real run, but where the kill lands is up to timing; here each partial state a kill
can leave is built on purpose."""

import json

import pytest

from esmloc import runs

IDENTITY = {"fingerprint": "f" * 64, "seed": 42}


def checkpoint(output_dir, step, files):
    directory = output_dir / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


WHOLE = {"model.safetensors": "weights", "optimizer.pt": "state", "trainer_state.json": json.dumps({"global_step": 1}),
         runs.RUN_RECORD: json.dumps(IDENTITY)}


@pytest.mark.parametrize("partial", [{}, {"model.safetensors": "weights"},
                                     {"model.safetensors": "weights", "trainer_state.json": '{"global_st'}],
                         ids=["empty directory", "weights only", "trainer state cut short"])
def test_a_checkpoint_saved_in_part_is_removed_and_the_one_before_resumed(tmp_path, partial, caplog):
    runs.write_record(tmp_path, IDENTITY)
    checkpoint(tmp_path, 10, WHOLE)
    checkpoint(tmp_path, 20, WHOLE)
    cut = checkpoint(tmp_path, 30, partial)

    assert runs.plan_resume(tmp_path, IDENTITY, length={}) == str(tmp_path / "checkpoint-20")
    assert not cut.exists()
    assert f"{cut} was not saved whole" in caplog.text
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]


def test_a_run_whose_only_checkpoint_is_partial_starts_afresh(tmp_path):
    runs.write_record(tmp_path, IDENTITY)
    checkpoint(tmp_path, 10, {"model.safetensors": "weights"})
    assert runs.plan_resume(tmp_path, IDENTITY, length={}) is None
    assert not list(tmp_path.glob("checkpoint-*"))


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    runs.write_record(tmp_path, IDENTITY)
    for step in (9, 10, 100):
        checkpoint(tmp_path, step, WHOLE)
    assert runs.plan_resume(tmp_path, IDENTITY, length={}) == str(tmp_path / "checkpoint-100")
