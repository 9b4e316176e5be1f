"""ImageShardDataModule: stream webdataset tar shards to (multi-GPU DDP) training and prediction.

The train pipeline follows open_clip's recipe (../shared/reference/ecosystem.md §2.3) with the DDP
pitfalls fixed explicitly:

1. the shard list is permuted by a seed and the *shared* epoch, identically on every rank and worker;
2. it is split by rank with the rank and world size taken from the Lightning trainer (never from
   environment variables, which Lightning's launcher does not set for every strategy), then by worker;
3. samples are shuffled in a buffer seeded by (seed, epoch, rank, worker), decoded, transformed with
   the backbone's CLIP transforms and batched with ``partial=False``;
4. ``with_epoch`` cuts every worker at the same number of batches, so every rank yields the same count
   and DDP cannot hang at the epoch end.

**What an epoch contains.** With S shards, R ranks and W workers, each worker receives at least
``floor(S / (R W))`` shards in every epoch. Each worker yields ``n = floor(m / B)`` batches, where m is
the sum of the ``floor(S / (R W))`` smallest shard sample counts (a bound that holds for every epoch's
permutation). So no sample is repeated within an epoch; the samples a worker has beyond ``n * B`` are
dropped for that epoch (which ones changes with the permutation). With equal shards and S divisible
by R W only the last partial batch of each worker is dropped.

**Resampled streaming** (``resampled: true``, open_clip's ``--dataset-resampled``) for datasets too large
for epochs: every reader draws shards *with replacement*, seeded by (seed, epoch, rank, worker), and an
epoch is ``samples_per_epoch`` samples (``floor(samples_per_epoch / (B R W))`` batches per reader, the
same on every rank). A sample may then appear twice in an epoch and another not at all, as in open_clip.

**Resume.** Data order is a pure function of (seed, epoch, rank, worker, batch). The loader's
``state_dict`` records the epoch and the number of batches trained on; after a mid-epoch resume each
worker skips its share of samples *before* decoding, so the epoch continues where it stopped.

**Corrupt data.** ``on_corrupt="skip"`` (default) skips an unreadable shard or sample, counts it and
logs a warning (the count is reported at the end of each epoch); ``"raise"`` stops at the first one
with a one-line error naming the shard and sample.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing as mp
import random
import sys
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from itertools import islice
from typing import Literal

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

from adapters.data import ImageSplit
from adapters.errors import ConfigError, UserError
from adapters.protocol import few_shot_indices
from datamodules import storage
from datamodules.distributed import per_device_batch_size
from datamodules.resumable import ResumableTrainLoader
from datamodules.shards import IMAGE_KEYS, ShardSplit, label_of, load_split, read_manifest

log = logging.getLogger(__name__)


class CorruptDataError(UserError):
    """A shard or sample could not be read or decoded (``on_corrupt="raise"``)."""


# -- pipeline stages (module-level functions so that they pickle for spawned workers) ---------------
def _shard_permutation(urls: list[str], seed: int, epoch) -> list[str]:
    order = list(urls)
    random.Random(f"shards-{seed}-{epoch.value}").shuffle(order)
    return order


def epoch_shuffled_shards(src, seed: int, epoch):
    """Permute the shard list by (seed, epoch): the same permutation on every rank and worker, so the
    rank and worker splits that follow partition it."""
    urls = [s["url"] for s in src]
    for url in _shard_permutation(urls, seed, epoch):
        yield {"url": url}


def resampled_shards(src, seed: int, shared: dict, rank: int, max_draws: int):
    """Shards drawn with replacement, seeded by (seed, epoch, rank, logical worker): every reader has its
    own stream, so no rank or worker split follows. Our own stage rather than ``wds.ResampledShards``,
    whose seed comes from the physical worker: a resumed epoch must redraw the same shards.

    ``max_draws`` bounds the stream, so that shards which all fail to read end in the one-line error of
    `EpochPipeline` instead of an endless loop."""
    urls = [s["url"] for s in src]
    rng = random.Random(f"resampled-{seed}-{shared['epoch'].value}-{rank}-{logical_worker(shared)[0]}")
    for _ in range(max_draws):
        yield {"url": rng.choice(urls)}


def split_by_rank(src, rank: int, world_size: int):
    """Keep every ``world_size``-th shard starting at ``rank`` (rank passed explicitly)."""
    for i, shard in enumerate(src):
        if i % world_size == rank:
            yield shard


def worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def logical_worker(shared: dict) -> tuple[int, int]:
    """(worker, workers) as the data order sees it.

    DataLoader workers hand out batches round-robin starting at worker 0, so global batch j comes from
    worker j % W. When an epoch resumes after b batches, physical worker w plays logical worker
    (w + b) % W, so that the first batch out is global batch b and the order continues unchanged.
    """
    worker, workers = worker_id()
    if shared["skip_epoch"].value == shared["epoch"].value:
        worker = (worker + shared["skip"].value) % workers
    return worker, workers


def split_by_logical_worker(src, shared: dict):
    worker, workers = logical_worker(shared)
    return islice(src, worker, None, workers)


def seeded_shuffle(src, bufsize: int, seed: int, shared: dict, rank: int):
    """A shuffle buffer whose RNG depends on (seed, epoch, rank, worker): reproducible order."""
    rng = random.Random(f"samples-{seed}-{shared['epoch'].value}-{rank}-{logical_worker(shared)[0]}")
    return wds.shuffle(bufsize=bufsize, initial=min(bufsize, 100), rng=rng)(src)  # webdataset's public stage


class _SkipToken:
    """Samples the next pass of a worker's pipeline must drop (set per epoch, consumed once)."""

    value = 0


def skip_samples(src, token: _SkipToken):
    """Drop ``token.value`` samples (before decoding: cheap), once: a repeated pass skips nothing."""
    skip, token.value = token.value, 0
    for i, sample in enumerate(src):
        if i >= skip:
            yield sample


class EpochPipeline(wds.DataPipeline):
    """``with_epoch(batches)`` that also resumes mid-epoch.

    Like ``with_epoch``, the source is repeated if needed and cut at ``batches`` batches per worker.
    After a resume in epoch ``skip_epoch`` with ``skip_batches`` batches already trained on, this
    (logical) worker first drops the samples of the batches it had produced and yields only the rest.
    """

    def __init__(self, *stages, batches: int, batch_size: int, token: _SkipToken, shared: dict, rank: int = 0):
        super().__init__(*stages)
        self.batches, self.batch_size, self.token, self.shared, self.rank = batches, batch_size, token, shared, rank

    def _skipped_batches(self) -> int:
        if self.shared["skip_epoch"].value != self.shared["epoch"].value:
            return 0
        worker, workers = logical_worker(self.shared)
        return max(0, -(-(self.shared["skip"].value - worker) // workers))

    def __iter__(self):
        skipped = self._skipped_batches()
        self.token.value = skipped * self.batch_size
        self.repetitions = sys.maxsize
        return self._exactly(max(0, self.batches - skipped))

    def _exactly(self, n: int):
        """Yield exactly ``n`` batches. A reader whose shards ran dry (all corrupt or empty) stops the run
        with an error: yielding fewer batches than the other ranks would leave them waiting forever."""
        count = 0
        for batch in islice(self.iterator(), n):
            count += 1
            yield batch
        if count < n:
            worker, workers = logical_worker(self.shared)
            raise CorruptDataError(f"rank {self.rank} worker {worker}/{workers}: its shards gave {count} of the {n} "
                                   "batches every "
                                   "reader must yield (corrupt or empty shards); stopping instead of hanging DDP")


def select_keys(src, keys: frozenset):
    for sample in src:
        if sample.get("__key__") in keys:
            yield sample


class _CorruptHandler:
    """webdataset exception handler implementing the corrupt-data policy (picklable, counts shared)."""

    def __init__(self, policy: str, counter):
        self.policy, self.counter = policy, counter

    def __call__(self, exn: Exception) -> bool:
        message = _describe(exn)
        if self.policy == "raise":
            raise CorruptDataError(message) from exn
        with self.counter.get_lock():
            self.counter.value += 1
            n = self.counter.value
        if n <= 10 or n % 100 == 0:
            log.warning("skipping corrupt data (%d so far): %s", n, message)
        return True


def _describe(exn: Exception) -> str:
    """One line naming the shard (and sample) behind a webdataset/PIL/tar exception."""
    if isinstance(exn, CorruptDataError):
        return str(exn)
    parts = [str(a) for a in exn.args if isinstance(a, str) and a]
    text = "; ".join(parts) or type(exn).__name__
    return " ".join(f"{type(exn).__name__}: {text}".split())


def decode_sample(sample: dict, transform: Callable, views: int, num_classes: int, label: str,
                  class_index: dict | None, augment_seed: int | None = None, shared: dict | None = None) -> dict:
    """Image bytes -> transformed tensor(s), label -> int; errors name the shard and sample key.

    With ``augment_seed``, the random augmentation of a sample is seeded by (seed, epoch, sample key) in a
    forked RNG: it no longer depends on which worker decodes it or on what that worker decoded before,
    so a resumed epoch and a re-sharded extraction see the same augmented views.
    """
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise CorruptDataError(f"{where}: no image member ({', '.join(IMAGE_KEYS)})")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes
        raise CorruptDataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    targets = None
    try:
        if label == "cls":
            y = int(sample["cls"])
        elif label == "multi":  # multi-label shards: json "labels", cls the first of them
            labels = [int(v) for v in json.loads(sample["json"])["labels"]]
            y = labels[0]
            targets = torch.zeros(num_classes)
            targets[labels] = 1.0
        else:
            y = label_of(sample, label, class_index, where)
    except (KeyError, ValueError, TypeError, UserError) as e:
        raise CorruptDataError(f"{where}: bad label ({e})") from None
    if not 0 <= y < num_classes:
        raise CorruptDataError(f"{where}: label {y} outside 0..{num_classes - 1}")
    seeded = augment_seed is not None
    with torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
        if seeded:
            epoch = shared["epoch"].value if shared is not None else 0
            torch.manual_seed(zlib.crc32(f"{augment_seed}-{epoch}-{sample['__key__']}".encode()))
        pixels = torch.stack([transform(image) for _ in range(views)]) if views > 1 else transform(image)
    out = {"image": pixels, "label": y, "key": sample["__key__"],
           "shard": str(sample.get("__url__", "")).rsplit("/", 1)[-1]}  # resumable extraction writes per shard
    if targets is not None:
        out["targets"] = targets
    return out


def collate(samples: list[dict]) -> dict:
    batch = {"image": torch.stack([s["image"] for s in samples]),
             "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
             "key": [s["key"] for s in samples], "shard": [s.get("shard", "") for s in samples]}
    if "targets" in samples[0]:
        batch["targets"] = torch.stack([s["targets"] for s in samples])
    return batch


# -- loaders ----------------------------------------------------------------------------------------
class _EpochSetter:
    """What Lightning takes for a sampler: it calls ``set_epoch`` before every epoch, resumed ones
    included (where ``on_train_epoch_start`` does not run), before the loader is iterated."""

    def __init__(self, datamodule: ImageShardDataModule):
        self.datamodule = datamodule

    def set_epoch(self, epoch: int) -> None:
        self.datamodule.set_epoch(epoch)


class ShardLoader:
    """A ``wds.WebLoader`` with a length Lightning reads and a ``state_dict`` for mid-epoch resume."""

    def __init__(self, loader: wds.WebLoader, length: int, datamodule: ImageShardDataModule | None = None):
        self.loader, self.length, self.datamodule = loader, length, datamodule
        if datamodule is not None:  # the train loader: Lightning sets its epoch (see _EpochSetter)
            self.sampler, self.batch_sampler = _EpochSetter(datamodule), None

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self) -> dict:
        dm = self.datamodule
        return {} if dm is None else dm.loader_state()

    def load_state_dict(self, state: dict) -> None:
        if self.datamodule is not None and state:
            self.datamodule.load_loader_state(state, self.length)


class ImageShardDataModule(ResumableTrainLoader, L.LightningDataModule):
    """Stream labelled images from webdataset shards (written by ``python -m datamodules.shards``).

    Args:
        shards: directory holding ``dataset.json`` (or the manifest file itself).
        train_split / val_split / test_split: split names in the manifest (``None`` to disable).
        predict_splits: splits that ``predict`` (feature extraction) iterates, one loader each.
        batch_size: samples per batch on each device.
        global_batch_size: samples per optimiser step over all devices (and accumulated batches);
            when set, the per-device ``batch_size`` is derived from it at setup, so a run on 8 GPUs
            trains with the batch a 1-GPU run uses (IMO's 128). Must divide evenly.
        num_workers: loader workers per rank.
        shots: K samples per class for the training split (``None``: all), chosen by ``fewshot_seed``
            with the protocol's sampler, from the index file (no image is opened to choose).
        fewshot_seed: the few-shot seed (1, 2, 3 in the CoOp protocol).
        seed: seed of shard permutation and sample shuffling.
        shuffle_buffer: samples in each worker's shuffle buffer.
        augment: use the backbone's few-shot train augmentation for training (else its eval transform).
        views: augmented views per training image in prediction and in the caches a model builds from the
            training split (pooled per image: the Tip-Adapter cache recipe); 1 means the eval transform.
        train_views: augmented views per image in each training batch (``image`` [B, V, C, H, W] when
            > 1): DAC's contrastive loss takes the other views of an image as positives. Each sample's
            views are seeded by (seed, epoch, sample key), so a resumed epoch sees the same views.
        on_corrupt: ``"skip"`` (count, warn, continue) or ``"raise"`` (fail on the first one).
        verify_shards: check every shard against the CRC32 in the manifest at setup (reads the shards
            once): a corrupt shard is then skipped (counted) or an error, per ``on_corrupt``. Catches bit
            flips inside images, which otherwise may still decode.
        read_retries: how often a remote shard whose read fails half-way is read again (continuing after
            the samples already delivered) before it counts as corrupt.
        retry_backoff: seconds before the first retry, doubled for each next one.
        resampled: draw training shards with replacement, per reader, for datasets too large for epochs
            (see the module docstring); needs ``samples_per_epoch``.
        samples_per_epoch: samples per training epoch over all ranks with ``resampled`` (open_clip's
            ``--train-num-samples``).

    ``shards`` is a local folder or a URL (``http(s)://``, ``s3://``, ``gs://``; see `datamodules.storage`)
    holding ``dataset.json``, or the manifest file itself.
    """

    def __init__(self, shards: str, train_split: str | None = "train", val_split: str | None = None,
                 test_split: str | None = None, predict_splits: Sequence[str] = ("train",), batch_size: int = 64,
                 global_batch_size: int | None = None,
                 num_workers: int = 2, shots: int | None = None, fewshot_seed: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, augment: bool = True, views: int = 1, train_views: int = 1,
                 on_corrupt: Literal["skip", "raise"] = "skip", verify_shards: bool = False, read_retries: int = 3,
                 retry_backoff: float = 0.2, resampled: bool = False, samples_per_epoch: int | None = None):
        super().__init__()
        if on_corrupt not in ("skip", "raise"):
            raise ConfigError(f"on_corrupt: must be 'skip' or 'raise', got {on_corrupt!r}")
        if batch_size < 1 or num_workers < 0 or views < 1 or train_views < 1:
            raise ConfigError("batch_size, views and train_views must be >= 1 and num_workers >= 0")
        if train_views > 1 and not augment:
            raise ConfigError("train_views: several views of an image need augment: true (else they are identical)")
        if resampled and not samples_per_epoch:
            raise ConfigError("samples_per_epoch: required with resampled: true (shards drawn with replacement "
                              "have no natural epoch)")
        if samples_per_epoch is not None and (not resampled or samples_per_epoch < 1):
            raise ConfigError("samples_per_epoch: a positive sample count, used with resampled: true only")
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.train_views = train_views
        self.global_batch_size = global_batch_size
        self.shards, self.train_split, self.val_split, self.test_split = shards, train_split, val_split, test_split
        self.predict_splits = list(predict_splits)
        self.batch_size, self.num_workers, self.shots, self.fewshot_seed = batch_size, num_workers, shots, fewshot_seed
        self.seed, self.shuffle_buffer, self.augment, self.views, self.on_corrupt = \
            seed, shuffle_buffer, augment, views, on_corrupt
        self.verify_shards = verify_shards
        self.read_retries, self.retry_backoff = read_retries, retry_backoff
        self._predict_excluded: dict[str, set[str]] = {}
        self.class_names: list[str] = load_split(shards, (train_split or self.predict_splits[0]))[1]
        self.dataset_name: str | None = read_manifest(shards).get("dataset")
        self.train_transform: Callable | None = None
        self.eval_transform: Callable | None = None
        self._shared = None

    # -- shared state: created per process (multiprocessing values do not pickle into spawned ranks) --
    @property
    def shared(self):
        if self._shared is None:
            self._shared = {name: mp.Value("i", -1 if name == "skip_epoch" else 0)
                            for name in ("epoch", "skip", "skip_epoch", "corrupt", "retried")}
        return self._shared

    # -- what the model asks for (adapters.base.AdapterData) ----------------------------------------------
    #: Images need the model's transforms; they carry no feature dimension, metadata, text features or
    #: file-level tensors (the model's backbone decides all of these).
    takes_images = True
    protocol = "full"  # val is the split named by val_split, whole
    dim = None
    text_features = None

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    @property
    def extras(self) -> dict:
        return {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def corrupt_count(self) -> int:
        """Corrupt shards/samples skipped so far in this process (all workers)."""
        return self.shared["corrupt"].value

    def set_epoch(self, epoch: int) -> None:
        """Called by the model at each train epoch start: reshuffles shards for the new epoch."""
        self.shared["epoch"].value = epoch

    def setup(self, stage: str) -> None:
        if self.global_batch_size and self.trainer is not None:
            self.batch_size = per_device_batch_size(self.global_batch_size, self.trainer)

    def set_transforms(self, train: Callable, eval: Callable) -> None:
        """The model's transforms (a method may train on its own, e.g. IMO without augmentation)."""
        self.train_transform, self.eval_transform = train, eval

    def _transform(self, train: bool) -> Callable:
        transform = self.train_transform if train else self.eval_transform
        if transform is None:
            raise ConfigError("ImageShardDataModule: no transforms (the model hands them over with set_transforms)")
        return transform

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


    # -- few-shot selection ---------------------------------------------------------------------------
    def _split(self, name: str) -> ShardSplit:
        """The manifest entry of split ``name``, without the shards that fail verification."""
        split, _ = load_split(self.shards, name)
        if not self.verify_shards:
            return split
        from datamodules.shards import file_crc32

        good = []
        for shard in split.shards:
            path = storage.join(split.root, shard["name"])
            if "crc32" in shard and file_crc32(path) != shard["crc32"]:
                message = f"{path}: shard fails its manifest checksum (corrupt or modified)"
                if self.on_corrupt == "raise":
                    raise CorruptDataError(message)
                log.warning("skipping %s", message)
                with self.shared["corrupt"].get_lock():
                    self.shared["corrupt"].value += 1
                continue
            good.append(shard)
        split.shards = good
        return split

    def _selection(self, split: ShardSplit) -> tuple[list[str], list[int], frozenset | None]:
        """(urls, sample count per url, selected keys or None) for ``split``."""
        if not self.shots or split.name != self.train_split:
            return split.urls, [s["count"] for s in split.shards], None
        keys, labels, shard_names = split.read_index()
        short = [c for c, n in enumerate(split.class_counts) if 0 < n < self.shots]
        if short:
            raise ConfigError(f"shots: {self.shots} is larger than the {split.class_counts[short[0]]} samples "
                              f"of class {short[0]} in {split.index_file}")
        chosen = few_shot_indices(labels, self.shots, self.fewshot_seed).tolist()
        per_shard: dict[str, int] = {}
        for i in chosen:
            per_shard[shard_names[i]] = per_shard.get(shard_names[i], 0) + 1
        names = [s["name"] for s in split.shards if s["name"] in per_shard]
        return [storage.join(split.root, n) for n in names], [per_shard[n] for n in names], \
            frozenset(keys[i] for i in chosen)

    def train_batches_per_worker(self, counts: Sequence[int], world: int, workers: int) -> int:
        """Batches every worker yields per epoch (see the module docstring for the bound)."""
        if self.resampled:
            n = self.samples_per_epoch // (self.batch_size * world * workers)
            if n == 0:
                raise ConfigError(f"samples_per_epoch: {self.samples_per_epoch} is less than one batch of "
                                  f"{self.batch_size} for each of the {world * workers} readers")
            return n
        per_worker = len(counts) // (world * workers)
        if per_worker == 0:
            raise ConfigError(f"{self.shards}: {len(counts)} shards with data for split {self.train_split!r} but "
                              f"num_workers ({workers}) x world_size ({world}) = {workers * world} readers need at "
                              "least one shard each; write smaller shards (--max_count) or use fewer workers")
        n = sum(sorted(counts)[:per_worker]) // self.batch_size
        if n == 0:
            raise ConfigError(f"batch_size: {self.batch_size} is larger than the {sum(sorted(counts)[:per_worker])} "
                              "samples each reader is guaranteed per epoch")
        return n

    # -- loaders --------------------------------------------------------------------------------------
    def _pipeline(self, split: ShardSplit, urls: list[str], *, train: bool, keys: frozenset | None,
                  transform: Callable, views: int, distributed: bool = True, batches: int = 0,
                  counts: Sequence[int] = (1,)) -> wds.DataPipeline:
        rank, world = self._rank_world() if distributed else (0, 1)
        shared = self.shared
        handler = _CorruptHandler(self.on_corrupt, shared["corrupt"])
        stages = [wds.SimpleShardList(urls)]
        if train and self.resampled:
            # enough draws for the epoch at the smallest shard size, four times over (skipped, corrupt shards)
            draws = 4 * (-(-batches * self.batch_size // max(1, min(counts)))) + 4 * len(urls)
            stages.append(partial(resampled_shards, seed=self.seed, shared=shared, rank=rank, max_draws=draws))
        elif train:
            stages += [partial(epoch_shuffled_shards, seed=self.seed, epoch=shared["epoch"]),
                       partial(split_by_rank, rank=rank, world_size=world),
                       partial(split_by_logical_worker, shared=shared)]
        else:
            stages += [partial(split_by_rank, rank=rank, world_size=world), wds.split_by_worker]
        stages += [partial(storage.tar_samples, handler=handler, retries=self.read_retries, backoff=self.retry_backoff,
                           failures=shared["retried"])]
        if keys is not None:
            stages.append(partial(select_keys, keys=keys))
        token = _SkipToken()
        if train:
            stages += [partial(seeded_shuffle, bufsize=self.shuffle_buffer, seed=self.seed, shared=shared, rank=rank),
                       partial(skip_samples, token=token)]
        stages += [wds.map(partial(decode_sample, transform=transform, views=views, num_classes=self.num_classes,
                                   label=split.label, class_index={c: i for i, c in enumerate(self.class_names)},
                                   augment_seed=self.seed, shared=shared if train else None),
                           handler=handler),
                   wds.batched(self.batch_size, collation_fn=collate, partial=not train)]
        if train:
            return EpochPipeline(*stages, batches=batches, batch_size=self.batch_size, token=token, shared=shared,
                                 rank=rank)
        return wds.DataPipeline(*stages)

    def _eval_length(self, counts: Sequence[int], rank: int, world: int, workers: int) -> int:
        """Exact batch count of rank ``rank`` for a deterministic (unshuffled) split with partial batches."""
        mine = list(counts)[rank::world]
        return sum(-(-sum(mine[w::workers]) // self.batch_size) for w in range(workers))

    def train_dataloader(self) -> ShardLoader:
        split = self._split(self.train_split)
        urls, counts, keys = self._selection(split)
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        per_worker = self.train_batches_per_worker(counts, world, workers)
        if self.trainer is not None:
            self.shared["epoch"].value = self.trainer.current_epoch
        transform = self._transform(train=self.augment)
        pipeline = self._pipeline(split, urls, train=True, keys=keys, transform=transform, views=self.train_views,
                                  batches=per_worker, counts=counts)
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers)
        return self._resume_loader(ShardLoader(loader.with_length(per_worker * workers), per_worker * workers, self))

    def _eval_selection(self, split_name: str) -> tuple[ShardSplit, list[str], list[int], frozenset | None]:
        split = self._split(split_name)
        urls, counts, keys = self._selection(split) if split_name == self.train_split else \
            (split.urls, [s["count"] for s in split.shards], None)
        return split, urls, counts, keys

    def shard_counts(self, split_name: str) -> dict[str, int]:
        """Samples each shard of ``split_name`` contributes (after few-shot selection), by shard name: what
        a resumable extraction checks its per-shard pieces against."""
        _, urls, counts, _ = self._eval_selection(split_name)
        return {url.rsplit("/", 1)[-1]: n for url, n in zip(urls, counts)}

    def exclude_from_predict(self, split_name: str, shard_names: set[str]) -> None:
        """Leave these shards out of the next ``predict`` (their features are already written)."""
        self._predict_excluded[split_name] = set(shard_names)

    def _eval_loader(self, split_name: str, views: int = 1, distributed: bool = True,
                     exclude: set[str] | None = None) -> ShardLoader:
        """Every sample of a split once, in shard order, with partial batches (split by rank unless
        ``distributed=False``), but for the shards named in ``exclude``. With ``views > 1`` each sample
        carries that many augmented views."""
        split, urls, counts, keys = self._eval_selection(split_name)
        if exclude:
            kept = [i for i, url in enumerate(urls) if url.rsplit("/", 1)[-1] not in exclude]
            urls, counts = [urls[i] for i in kept], [counts[i] for i in kept]
        rank, world = self._rank_world() if distributed else (0, 1)
        if len(urls) < world and not exclude:
            raise ConfigError(f"{self.shards}: split {split_name!r} has {len(urls)} shards for "
                              f"world_size {world}: every rank needs at least one")
        workers = max(1, min(self.num_workers, len(urls[rank::world])))
        transform = self._transform(train=views > 1)
        pipeline = self._pipeline(split, urls, train=False, keys=keys, transform=transform, views=views,
                                  distributed=distributed)
        length = self._eval_length(counts, rank, world, workers)
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False,
                               num_workers=workers if self.num_workers and urls[rank::world] else 0)
        return ShardLoader(loader.with_length(length), length)

    def val_dataloader(self):
        return [] if self.val_split is None else self._eval_loader(self.val_split)

    def test_dataloader(self):
        return [] if self.test_split is None else self._eval_loader(self.test_split)

    def predict_dataloader(self):
        return [self._eval_loader(s, self.views if s == self.train_split else 1, exclude=self._predict_excluded.get(s))
                for s in self.predict_splits]

    def head_data(self) -> tuple[ImageSplit, ImageSplit | None]:
        """The (few-shot) training split, with ``views`` augmented views per image, and val, each whole and
        in this process alone (caches and hyper-parameter searches need whole sets): images for the
        model to embed (`AdapterModule.embed_split`, views pooled as Tip-Adapter builds its cache)."""
        train = ImageSplit(self._eval_loader(self.train_split, self.views, distributed=False), self.train_split)
        val = ImageSplit(self._eval_loader(self.val_split, 1, distributed=False), self.val_split) if self.val_split else None
        return train, val

    # -- resume ---------------------------------------------------------------------------------------
    def loader_state(self) -> dict:
        """Epoch and batches trained on so far in it (Lightning's own count, not the prefetching loader's)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": done, "seed": self.seed}

    def load_loader_state(self, state: dict, length: int) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming with a different data seed: the epoch restarts from its first batch")
            return
        if 0 < state.get("batches", 0) < length:
            self.shared["skip_epoch"].value = state["epoch"]
            self.shared["skip"].value = state["batches"]

    def state_dict(self) -> dict:
        return {"corrupt_skipped": self.corrupt_count}
