"""Configuration of the federated data: which data set, how many clients, how it is split."""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pfl_mpi.errors import ConfigError

DataName = Literal["digits", "mnist1d", "synthetic", "file", "cifar10", "cifar100", "femnist", "shakespeare", "hf"]
PartitionName = Literal["natural", "iid", "dirichlet", "shards", "quantity"]
EvalSplit = Literal["test", "val"]
EVAL_SPLITS: tuple[str, ...] = ("test", "val")  # the order in which an evaluation round scores them
ROOTED = ("cifar10", "cifar100", "femnist", "shakespeare", "hf")  # data sets read from data.root
LEAF = ("femnist", "shakespeare")
_NO_USERS = ("digits", "mnist1d", "synthetic", "cifar10", "cifar100")


class SyntheticConfig(BaseModel):
    """Synthetic(alpha, beta) of FedProx (Li et al., MLSys 2020, section 5)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    alpha: float = Field(
        1.0, ge=0, description="Spread of the local models: u_k ~ N(0, alpha) is the mean of W_k and b_k."
    )
    beta: float = Field(
        1.0, ge=0, description="Spread of the local inputs: B_k ~ N(0, beta) is the mean of v_k (x's mean)."
    )
    iid: bool = Field(
        False,
        description="Synthetic-IID: one W, b shared by all clients and x ~ N(0, Sigma) everywhere "
        "(alpha and beta are then unused).",
    )
    dimension: int = Field(60, ge=1, description="Input dimension d.")
    num_classes: int = Field(10, ge=2, description="Number of classes.")
    size_mean: float = Field(
        4.0, description="Samples per client: int(lognormal(size_mean, size_sigma)) + size_offset."
    )
    size_sigma: float = Field(2.0, ge=0, description="Sigma of the lognormal number of samples per client.")
    size_offset: int = Field(50, ge=2, description="Samples every client gets on top of the lognormal draw.")
    max_samples: int | None = Field(
        None,
        ge=2,
        description="Cap on samples per client (train + test). None: no cap, as in the paper; the lognormal "
        "tail is heavy (with 1,000 clients the largest one holds ~34,000 samples, median of the max).",
    )


class Mnist1dConfig(BaseModel):
    """MNIST-1D (Greydanus 2020), generated locally from the templates shipped in the ``mnist1d`` package."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    num_samples: int = Field(
        4000,
        ge=10,
        multiple_of=10,
        description="Samples generated in total (the generator makes num_samples / 10 per class); "
        "they are pooled and then partitioned.",
    )
    seed: int = Field(
        42,
        ge=0,
        description="Seed of the generator; fixes the pooled data set (42 is the package's default). "
        "The partition is drawn from the run seed.",
    )
    shuffle_seq: bool = Field(
        False, description="Permute the 40 positions of every signal (the package's 'shuffled' variant)."
    )


class PublicConfig(BaseModel):
    """A public data set shared by every client (FedMD's D0), beside the clients' private data."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    source: Literal["holdout", "digits", "mnist1d"] = Field(
        "holdout",
        description="holdout: `size` samples of the clients' own pooled data set (digits, mnist1d, file), held "
        "apart before partitioning, so that no client holds them (which ones: drawn from the data seed); "
        "digits / mnist1d: that data set, which must have the clients' input shape and classes (mnist1d "
        "generated with `mnist1d_seed`).",
    )
    size: int = Field(..., ge=1, description="Public samples.")
    mnist1d_seed: int = Field(
        1,
        ge=0,
        description="source mnist1d only: seed of the generator that makes the public samples; it must differ "
        "from data.mnist1d.seed when the clients' data are MNIST-1D too (else both sets would be the same).",
    )


class AugmentConfig(BaseModel):
    """Image augmentation of every training batch on the device (see ``pfl_mpi/data/augment.py``)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    crop_padding: int = Field(
        4, ge=0, description="Random crop: pad each side with this many zeros, crop back to H x W; 0: no crop."
    )
    flip: bool = Field(True, description="Random horizontal flip with probability 1/2.")


class HfConfig(BaseModel):
    """Columns and splits of a Hugging Face data set read from disk (``name: hf``)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    x: str = Field(
        "image",
        description="Column of the inputs: an Image feature (decoded, scaled to [0, 1], channels first) "
        "or numbers (a scalar, a list or a nested array per row).",
    )
    y: str = Field("label", description="Column of the integer labels 0..C-1 (Value or ClassLabel).")
    client: str | None = Field(
        None, description="Column of client ids (integers or strings), for the natural partition; None: none."
    )
    train_split: str = Field("train", description="Split of a DatasetDict (save_to_disk) read as training data.")
    test_split: str | None = Field(
        "test", description="Split read as the official test data (absent from the directory: none)."
    )
    val_split: str | None = Field(
        "validation", description="Split read as validation data (absent from the directory: none)."
    )


class DataConfig(BaseModel):
    """Which data set, how many clients, how the samples are dealt out and split into train and test."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    name: DataName = Field(
        "digits",
        description="digits: scikit-learn's 8x8 digits (1,797 samples); mnist1d: MNIST-1D; synthetic: "
        "FedProx's Synthetic(alpha, beta); file: your own .npz or .h5 (see path); cifar10 / cifar100: the "
        "python-pickle batches in data.root; femnist / shakespeare: LEAF's json in data.root (train/, test/); "
        "hf: a Hugging Face data set saved with save_to_disk, or parquet / arrow files (data.root, data.hf).",
    )
    num_clients: int = Field(100, ge=1, description="Number of simulated clients N.")
    partition: PartitionName | None = Field(
        None,
        description="How pooled samples are dealt to clients: natural (synthetic, or a file with a "
        "'client' array), iid, dirichlet (label skew), shards (classes_per_client classes each), quantity "
        "(size skew). None: natural for synthetic and for files with client ids, else iid.",
    )
    dirichlet_alpha: float = Field(
        0.5,
        gt=0,
        description="dirichlet: concentration alpha of q_k ~ Dir(alpha * p), p the pooled class "
        "frequencies (Hsu et al. 2019); small alpha = few classes per client.",
    )
    classes_per_client: int = Field(
        2, ge=1, description="shards: distinct classes per client (pFedHN's split, Shamsian et al. 2021)."
    )
    quantity_sigma: float = Field(
        1.0,
        gt=0,
        description="quantity: client sizes proportional to lognormal(0, sigma) weights on top of "
        "min_samples; labels iid.",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Fraction of each client's samples held out as its test set."
    )
    stratify: bool = Field(
        True, description="Split each client's samples into train and test with its label proportions kept."
    )
    min_samples: int = Field(
        10,
        ge=2,
        description="Fewest samples (train + test) any client may hold; a partition that cannot give every "
        "client this many is rejected. At least 2, so that every client has 1 train and 1 test sample.",
    )
    path: str | None = Field(
        None,
        description="file only: a .npz or .h5/.hdf5 with arrays x (float, [n, ...]), y (int labels 0..C-1, or "
        "real values with targets: values) "
        "and optionally client (int client id per sample, for the natural partition).",
    )
    targets: Literal["labels", "values"] = Field(
        "labels",
        description="file only: what the file's y holds. labels: integer class labels 0..C-1; values: real-valued "
        "targets for task: regression, shape [n] or [n, k] (k outputs), kept as float32. Partitions that deal "
        "out classes (dirichlet, shards) do not apply to values, and the train/test split is not stratified.",
    )
    root: str | None = Field(
        None,
        description="cifar10 / cifar100 / femnist / shakespeare / hf only: where the data set sits on disk, as "
        "distributed: cifar-10-batches-py/ or cifar-100-python/; LEAF's data/<name>/data (train/*.json, "
        "test/*.json); a save_to_disk directory or a .parquet / .arrow file or a directory of them.",
    )
    cifar100_labels: Literal["fine", "coarse"] = Field(
        "fine", description="cifar100 only: the 100 fine labels or the 20 coarse superclasses."
    )
    test_from: Literal["official", "client"] | None = Field(
        None,
        description="Where clients' test sets come from. official: the data set's own test split (CIFAR's test "
        "batch dealt out so that each client's test labels follow its train labels, pFedHN's protocol; LEAF's "
        "per-user split; a file's or HF set's split), never mixed with training data; client: each client's "
        "train samples split by test_fraction (the official test set unused; natural partitions pool the "
        "user's own train and test samples). None: official when the data set has a test split, else client.",
    )
    max_clients: int | None = Field(
        None,
        ge=1,
        description="Natural partitions (LEAF, files, HF with client ids): keep this many users, drawn from the "
        "data seed; num_clients must then equal it (or the number of users if fewer). None: every user.",
    )
    val_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each client's training samples held out as its validation set (stratified "
        "like test). 0: none, or the data set's own validation split if it has one.",
    )
    eval_on: list[EvalSplit] | None = Field(
        None,
        min_length=1,
        description="Held-out sets every evaluation round scores, each recorded under its own names: test "
        "(test_loss, test_acc, ...) and val (val_loss, val_acc, ...). [val, test] for hyper-parameter "
        "selection (select on val, report test of the same rounds); [val] keeps the test sets unseen. val needs "
        "a validation split (data.val_fraction or the data set's own). None: [test], or data.eval_split.",
    )
    eval_split: EvalSplit | None = Field(
        None,
        description="Deprecated: data.eval_split: X is data.eval_on: [X] (its metrics are named after X, val_* "
        "for val). Set one of the two.",
    )
    augment: AugmentConfig | None = Field(
        None, description="Image augmentation of training batches (random crop with padding, flip); None: off."
    )
    hf: HfConfig = Field(default_factory=HfConfig, description="name: hf only: columns and splits.")
    seed: int | None = Field(
        None,
        ge=0,
        description="Seed of the data alone (partition, splits, synthetic samples). None: the run's seed. "
        "Set it to keep the same clients across runs with different training seeds.",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="name: synthetic only.")
    mnist1d: Mnist1dConfig = Field(default_factory=Mnist1dConfig, description="name: mnist1d only.")
    public: PublicConfig | None = Field(
        None, description="A public data set shared by all clients (FedMD); None: none. See PublicConfig."
    )
    novel_clients: int | float = Field(
        0,
        ge=0,
        description="Novel clients, held out of training: partitioned and hosted like the others but never sampled, "
        "never aggregated; after the last round each is served by its algorithm's rule (docs/novel_clients.md). "
        "A count, or a fraction in (0, 1) of the clients (rounded). Which ones: drawn from the data seed.",
    )

    def novel_count(self, num_clients: int) -> int:
        """How many of ``num_clients`` clients ``novel_clients`` holds out."""
        n = self.novel_clients
        return int(round(n * num_clients)) if isinstance(n, float) else int(n)

    @model_validator(mode="after")
    def _eval_split_is_deprecated(self) -> DataConfig:
        if self.eval_split is not None:
            warnings.warn(
                f"data.eval_split is deprecated: write data.eval_on: [{self.eval_split}] (metrics named "
                f"{self.eval_split}_*)",
                FutureWarning,
                stacklevel=2,
            )
        return self

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The held-out sets an evaluation round scores, in scoring order (``EVAL_SPLITS``): ``eval_on``, else
        the deprecated ``eval_split``, else test."""
        chosen = self.eval_on or [self.eval_split or "test"]
        return tuple(s for s in EVAL_SPLITS if s in chosen)


def check_static(cfg: DataConfig) -> None:
    """Reject combinations of options that are wrong whatever the data; raises ``ConfigError``."""
    if cfg.name == "file" and not cfg.path:
        raise ConfigError("data.path", "required when data.name is 'file'")
    if cfg.name != "file" and cfg.path is not None:
        raise ConfigError("data.path", f"only read when data.name is 'file', but data.name is {cfg.name!r}")
    if cfg.targets == "values":
        _check_values(cfg)
    if cfg.eval_on is not None and cfg.eval_split is not None:
        raise ConfigError("data.eval_split", f"deprecated, and set beside data.eval_on: keep eval_on: {cfg.eval_on}")
    if cfg.name in ROOTED and not cfg.root:
        raise ConfigError("data.root", f"required when data.name is {cfg.name!r}: the directory the data set sits in")
    if cfg.name not in ROOTED and cfg.root is not None:
        raise ConfigError("data.root", f"only read for {', '.join(ROOTED)}, but data.name is {cfg.name!r}")
    if cfg.name in ("cifar10", "cifar100") and cfg.partition == "natural":
        raise ConfigError("data.partition", f"{cfg.name} has no natural split by client; use iid, dirichlet or shards")
    if cfg.name in LEAF and cfg.partition not in (None, "natural"):
        raise ConfigError(
            "data.partition",
            f"{cfg.name} is read with LEAF's natural partition (one client per user), not {cfg.partition!r}",
        )
    if cfg.name in ("digits", "mnist1d", "synthetic") and cfg.test_from == "official":
        raise ConfigError("data.test_from", f"{cfg.name} has no official test split; use client")
    if cfg.max_clients is not None and (cfg.partition not in (None, "natural") or cfg.name in _NO_USERS):
        raise ConfigError("data.max_clients", "only applies to natural partitions (data sets with client ids)")
    if cfg.public is not None and cfg.name in ROOTED:
        raise ConfigError("data.public", f"not available for {cfg.name}; use digits, mnist1d or file")
    if cfg.name == "synthetic" and cfg.partition not in (None, "natural"):
        raise ConfigError(
            "data.partition",
            f"synthetic data is generated per client, so only 'natural' applies, not {cfg.partition!r}",
        )
    if cfg.name in ("digits", "mnist1d") and cfg.partition == "natural":
        raise ConfigError(
            "data.partition",
            f"{cfg.name} has no natural split by client; use iid, dirichlet, shards or quantity",
        )
    _check_public(cfg)
    syn = cfg.synthetic
    if cfg.name == "synthetic" and syn.max_samples is not None and syn.max_samples < cfg.min_samples:
        raise ConfigError(
            "data.synthetic.max_samples",
            f"{syn.max_samples} is below data.min_samples = {cfg.min_samples}",
        )
    if cfg.name == "synthetic" and syn.size_offset < cfg.min_samples:
        raise ConfigError(
            "data.synthetic.size_offset",
            f"{syn.size_offset} is below data.min_samples = {cfg.min_samples}; the smallest client would "
            "hold too few samples",
        )


LABEL_PARTITIONS = ("dirichlet", "shards")  # they deal out classes: not for real-valued targets


def _check_values(cfg: DataConfig) -> None:
    """``data.targets: values`` (real-valued regression targets): only a file's y, no partition by class."""
    if cfg.name != "file":
        raise ConfigError("data.targets", f"values are read from a file's y (data.name: file), not {cfg.name!r}")
    if cfg.partition in LABEL_PARTITIONS:
        raise ConfigError(
            "data.partition",
            f"{cfg.partition} deals out class labels, but data.targets is values (real-valued y); "
            "use iid, quantity or natural",
        )
    if cfg.public is not None:
        raise ConfigError("data.public", "not available with data.targets: values (the public set holds labels)")


def _check_public(cfg: DataConfig) -> None:
    public = cfg.public
    if public is None:
        return
    if cfg.name == "synthetic":
        raise ConfigError(
            "data.public", "synthetic data are generated per client and have no public set; use digits, mnist1d or file"
        )
    if public.source == cfg.name == "digits":
        raise ConfigError(
            "data.public.source", "digits is the clients' own data set: use holdout to hold part of it apart"
        )
    if public.source == cfg.name == "mnist1d" and public.mnist1d_seed == cfg.mnist1d.seed:
        raise ConfigError(
            "data.public.mnist1d_seed",
            f"{public.mnist1d_seed} equals data.mnist1d.seed: the public samples would be the clients' own",
        )
