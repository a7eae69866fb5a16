"""Where lessons keep their state: Drive on Colab (mount emulated: it needs a Google account), unchanged elsewhere."""

from pathlib import Path

import pytest

from course_utils.storage import CACHE_ENV, DRIVE_FOLDER, course_storage


def _mounter(calls):
    def mount(mountpoint: Path):
        calls.append(mountpoint)
        (mountpoint / "MyDrive").mkdir(parents=True)  # what google.colab.drive.mount leaves behind
    return mount


def test_off_colab_nothing_moves_or_mounts(tmp_path):
    calls, env = [], {}
    assert course_storage("build/course", colab=False, mount=_mounter(calls), drive_root=tmp_path / "MyDrive",
                          env=env) == "build/course"
    assert calls == [] and env == {}


def test_on_colab_output_and_cache_go_to_drive(tmp_path, capsys):
    calls, env, drive = [], {}, tmp_path / "drive" / "MyDrive"
    out = course_storage("build/course", colab=True, mount=_mounter(calls), drive_root=drive, env=env)
    assert Path(out) == drive / DRIVE_FOLDER / "build" / "course" and Path(out).is_dir()
    assert calls == [drive.parent] and env[CACHE_ENV] == str(drive / DRIVE_FOLDER / "cache")
    assert "outlive this runtime" in capsys.readouterr().out
    # a second lesson in the same runtime: Drive is already there, no second mount; a cache the learner set is kept
    env[CACHE_ENV] = "/somewhere/else"
    course_storage("/abs/results", colab=True, mount=_mounter(calls), drive_root=drive, env=env)
    assert len(calls) == 1 and env[CACHE_ENV] == "/somewhere/else"


def test_absolute_output_dir_is_kept(tmp_path):
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    assert course_storage(str(tmp_path / "mine"), colab=True, drive_root=drive, env={}) == str(tmp_path / "mine")


def test_use_drive_false_warns_that_results_will_be_lost(tmp_path, capsys):
    assert course_storage("build/course", False, colab=True, drive_root=tmp_path / "MyDrive", env={}) == "build/course"
    assert "lost when it disconnects" in capsys.readouterr().out


def test_a_mount_that_fails_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="USE_DRIVE = False"):
        course_storage("build/course", colab=True, mount=lambda mountpoint: None, drive_root=tmp_path / "MyDrive",
                       env={})
