"""Nothing that can run code is loaded from storage others can write (issue 22): Tune's state
(``Tuner.restore`` unpickles it) and a trial's pickled error are read only when this user owns
them and nobody else can write to them; checkpoints never unpickle objects at all
(tests/test_checkpoint_safety.py)."""

import os
import pickle
from types import SimpleNamespace

from ray_jobs.progress import _trial_exception
from ray_jobs.settings import untrusted_pickles


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_others_can_write_is_not_unpickled(tmp_path):
    """Before: the sweep's progress display unpickled every failed trial's error file from the
    (shared) storage: a planted file ran its code. Now a file others can write is not read."""
    storage = tmp_path / "ray"
    trial_dir = storage / "sweep" / "trial_0"
    trial_dir.mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    for folder in (storage, storage / "sweep", trial_dir):
        os.chmod(folder, 0o755)
    marker = tmp_path / "pwned"
    error_file = trial_dir / "error.pkl"
    error_file.write_bytes(pickle.dumps(_RunsCode(marker)))
    os.chmod(error_file, 0o666)
    trial = SimpleNamespace(pickled_error_file=str(error_file), error_message="boom\nmore")
    assert "writable by other users" in untrusted_pickles(error_file)
    assert "writable by other users" in untrusted_pickles(storage / "sweep")
    result = _trial_exception(trial)
    assert not marker.exists() and isinstance(result, str)  # the text, not the object

    os.chmod(error_file, 0o644)
    os.chmod(trial_dir, 0o777)  # a folder others can write: they could swap the file
    assert "writable by other users" in untrusted_pickles(error_file)
    os.chmod(trial_dir, 0o755)
    assert untrusted_pickles(error_file) is None
    assert untrusted_pickles(storage / "sweep") is None
