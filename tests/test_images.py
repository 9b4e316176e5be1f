import io
import json
import tarfile

import lightning as L
import pytest

from adapters.errors import ConfigError
from datamodules.images import CorruptDataError, ImageShardDataModule
from tests.helpers import TRANSFORM, KeyRecorder, make_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    # 9 classes x 8 images = 72 samples in 9 shards of 8
    return make_shards(tmp_path_factory.mktemp("shards"), per_class=8, max_count=8)


def _dm(shards, **kw):
    dm = ImageShardDataModule(str(shards), **{"batch_size": 4, "num_workers": 2, **kw})
    dm.set_transforms(TRANSFORM, TRANSFORM)
    return dm


def _epoch_keys(dm, epoch=0):
    dm.set_epoch(epoch)
    return [k for batch in dm.train_dataloader() for k in batch["key"]]


def test_one_epoch_sees_each_sample_at_most_once_and_equal_worker_counts(shard_dir):
    dm = _dm(shard_dir)
    loader = dm.train_dataloader()
    # 9 shards, 2 workers: every worker gets >= 4 shards (32 samples) -> 8 batches of 4 each
    assert len(loader) == 16
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 64 == len(set(keys))
    assert all(batch["image"].shape == (4, 3, 16, 16) for batch in loader)


def test_order_is_a_function_of_seed_and_epoch(shard_dir):
    a, b = _epoch_keys(_dm(shard_dir), 0), _epoch_keys(_dm(shard_dir), 0)
    assert a == b
    assert _epoch_keys(_dm(shard_dir), 1) != a
    assert _epoch_keys(_dm(shard_dir, seed=5), 0) != a


def test_few_shot_selection_is_seeded_and_k_per_class(shard_dir):
    def selected(seed):
        dm = _dm(shard_dir, shots=2, fewshot_seed=seed, num_workers=0, batch_size=1)
        return {k for batch in dm.predict_dataloader()[0] for k in batch["key"]}, dm
    keys1, dm = selected(1)
    assert len(keys1) == 18
    labels = [int(line.split("\t")[1]) for line in (shard_dir / "train-index.tsv").read_text().splitlines()
              if line.split("\t")[0] in keys1]
    assert sorted(labels) == sorted(list(range(9)) * 2)
    assert selected(1)[0] == keys1 and selected(2)[0] != keys1
    with pytest.raises(ConfigError, match="shots: 9 is larger than the 8 samples"):
        _dm(shard_dir, shots=9).train_dataloader()


RESAMPLED = {"resampled": True, "samples_per_epoch": 100}


@pytest.mark.parametrize("done,kw", [(1, {}), (4, {}), (5, {}), (15, {}), (5, RESAMPLED), (23, RESAMPLED)])
def test_resume_continues_the_epoch_exactly_where_it_stopped(shard_dir, done, kw):
    """After `done` batches (2 workers), the resumed stream is the rest of the same epoch, in order."""
    full = _epoch_keys(_dm(shard_dir, **kw), 1)
    dm = _dm(shard_dir, **kw)
    dm.load_loader_state({"epoch": 1, "batches": done, "seed": 0}, length=len(full) // 4)
    assert _epoch_keys(dm, 1) == full[done * 4:]
    assert _epoch_keys(dm, 2) == _epoch_keys(_dm(shard_dir, **kw), 2)  # later epochs are whole again


def test_resampled_epoch_is_a_sample_count_drawn_with_replacement(shard_dir):
    """open_clip's --dataset-resampled: 100 samples per epoch -> floor(100 / (4 x 2 readers)) = 12 batches
    per worker; shards are drawn with replacement, so samples repeat; the draw is a function of
    (seed, epoch)."""
    dm = _dm(shard_dir, **RESAMPLED)
    assert len(dm.train_dataloader()) == 24
    keys = _epoch_keys(dm, 0)
    assert len(keys) == 96 and len(set(keys)) < 72
    assert keys == _epoch_keys(_dm(shard_dir, **RESAMPLED), 0)
    assert keys != _epoch_keys(dm, 1) and keys != _epoch_keys(_dm(shard_dir, **RESAMPLED, seed=3), 0)
    with pytest.raises(ConfigError, match="samples_per_epoch: required"):
        _dm(shard_dir, resampled=True)
    with pytest.raises(ConfigError, match="samples_per_epoch: 7 is less than one batch"):
        _dm(shard_dir, resampled=True, samples_per_epoch=7).train_dataloader()


def test_too_few_shards_for_workers_times_world_size(shard_dir):
    with pytest.raises(ConfigError, match=r"9 shards .* num_workers \(10\) x world_size \(1\)"):
        _dm(shard_dir, num_workers=10).train_dataloader()


def _corrupt_copy(shard_dir, tmp_path, kind):
    import shutil
    target = tmp_path / kind
    shutil.copytree(shard_dir, target)
    victim = target / "train-000003.tar"
    if kind == "truncated":
        victim.write_bytes(victim.read_bytes()[:2000])
    else:  # a member named .jpg that is not an image
        with tarfile.open(victim) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(victim, "w") as tar:
            for m, data in members:
                if m.name.endswith(".jpg") and m.name.startswith(members[0][0].name.split(".")[0]):
                    data = b"this is not a jpeg"
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    return target


@pytest.mark.parametrize("kind", ["truncated", "not_jpeg"])
def test_corrupt_data_skip_counts_and_raise_names_the_shard(shard_dir, tmp_path, kind):
    bad = _corrupt_copy(shard_dir, tmp_path, kind)
    dm = _dm(bad, num_workers=0, batch_size=1, predict_splits=["train"])
    keys = [k for batch in dm.predict_dataloader()[0] for k in batch["key"]]
    assert dm.corrupt_count >= 1 and 64 <= len(keys) < 72
    dm = _dm(bad, num_workers=0, batch_size=1, on_corrupt="raise")
    with pytest.raises(CorruptDataError, match="train-000003.tar"):
        for _ in dm.predict_dataloader()[0]:
            pass


@pytest.mark.timeout(120)
def test_two_process_ddp_equal_batches_disjoint_samples(shard_dir, tmp_path):
    """2 ranks x 2 workers over 9 shards (not a multiple of 4): no hang, same batch count on every
    rank, no sample twice in an epoch; 8 of 72 samples are dropped (the 3rd shard of one reader)."""
    dm = _dm(shard_dir, num_workers=2, batch_size=4)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=dm)
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["batches"] == ranks[1]["batches"] == 8
        keys = ranks[0]["keys"] + ranks[1]["keys"]
        assert len(keys) == len(set(keys)) == 64
        assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])


@pytest.mark.timeout(120)
def test_two_process_ddp_resampled_equal_batches_own_streams(shard_dir, tmp_path):
    """Resampled over 2 ranks: each rank draws its own shards, every rank yields the same batch count."""
    dm = _dm(shard_dir, num_workers=1, batch_size=4, resampled=True, samples_per_epoch=40)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}-epoch0.json").read_text()) for r in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 5
    assert ranks[0]["keys"] != ranks[1]["keys"]
