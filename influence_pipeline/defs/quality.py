"""On-demand Dagster assets that measure attribution quality (group ``quality``; no
automation condition, so nothing here runs nightly or by itself):

* ``quality_retrained`` (static partitions ``part-00`` …): the model retrained, through the
  workload's retraining function, on this partition's share of M random training subsets
  (fraction α), with the measuring seed and a second seed for the ceiling; each test point's
  loss is persisted as a parquet table named by a digest of the settings and data, and
  reused when it exists. Partitions fan the retraining out over runs (or machines).
* ``attribution_lds``: every method's LDS against the retrained losses with its bootstrap
  interval, the seed-to-seed ceiling, and per method the fit/factor/score time, peak
  memory and agreement with Direct (``quality/lds`` table, markdown and a bar chart).
* ``mislabel_metrics`` (workloads with known corrupted labels): fraction found in the top
  1/5/10/20 % and average precision per ranking (the audit's when an audit exists,
  self-influence per method, loss, leave-one-out loss, random) and the precision/recall of
  each audit flag, with the curve as a PNG in the metadata.
* ``methods_comparison``: the two tables joined per method.

Materialize from the command line with
``dagster asset materialize -m influence_pipeline.definitions --select 'quality_retrained'``
(all partitions via a backfill in the UI) and then the three reports.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import dagster as dg
import numpy as np
import pandas as pd
import torch

from ..analysis.audit import FLAGS, audit_examples
from ..analysis.markdown import frame_to_markdown
from ..analysis.plots import markdown_image
from ..quality import flag_quality, sample_subsets
from ..quality.mislabel import mislabel_report, per_sample_losses, self_influences
from ..quality.report import (
    RetrainFunction,
    actual_losses,
    bar_png,
    compare_methods,
    mislabel_curve_png,
    retrain_subsets,
)
from ..store.provenance import tensors_fingerprint
from ..workload import MethodSpec, ShardData, Workload
from .resources import InfluenceStoreResource

GROUP = "quality"


class QualityTables:
    """Parquet tables under ``<store root>/quality/`` (any fsspec URL). The store's own
    table registry knows only the pipeline's tables, so the quality reports keep theirs
    beside it: ``<name>.parquet``, written to a temporary name and moved into place."""

    def __init__(self, store: InfluenceStoreResource) -> None:
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(store.root, **json.loads(store.storage_options_json))
        self.root = f"{root.rstrip('/')}/quality"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}.parquet"

    def write(self, name: str, frame: pd.DataFrame) -> str:
        path = self.path(name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp"
        with self.fs.open(tmp, "wb") as handle:
            frame.to_parquet(handle, index=False)
        self.fs.mv(tmp, path)
        return path

    def read(self, name: str) -> pd.DataFrame | None:
        path = self.path(name)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as handle:
            return pd.read_parquet(handle)


def default_quality_methods() -> dict[str, MethodSpec]:
    """Each method as the README's LDS table measured it (λ = 1e-2, rank 50 for Arnoldi and
    Nyström, whatever ``MethodSpec``'s current defaults are), seeded."""
    return {
        "direct": MethodSpec("direct", 1e-2),
        "cg": MethodSpec("cg", 1e-2, options={"rtol": 1e-6, "maxiter": 500}),
        "lissa": MethodSpec("lissa", 1e-2, options={"seed": 0, "warn_on_max_iteration": False}),
        "arnoldi": MethodSpec("arnoldi", 1e-2, rank=50, options={"seed": 0}),
        "ekfac": MethodSpec("ekfac", 1e-2),
        "nystroem": MethodSpec("nystroem", 1e-2, rank=50, options={"seed": 0}),
        "ihm": MethodSpec("ihm", 1e-2),
    }


@dataclass(frozen=True)
class QualitySettings:
    """What the quality assets measure. ``methods`` default: all seven at their defaults;
    ``mislabel_methods``: the methods whose self-influence ranks training examples (they
    cost one self-influence per training example)."""

    test_set: str | None = None  # default: the workload's first test set
    n_subsets: int = 100
    fraction: float = 0.5
    seed: int = 0
    ceiling_seed: int = 1
    n_partitions: int = 10
    float64: bool = True
    methods: Mapping[str, MethodSpec] = field(default_factory=default_quality_methods)
    mislabel_methods: Sequence[str] = ("direct", "ekfac", "arnoldi", "nystroem", "ihm")

    def __post_init__(self) -> None:
        if not 1 <= self.n_partitions <= self.n_subsets:
            raise ValueError(
                f"n_partitions must lie in [1, n_subsets = {self.n_subsets}], got "
                f"{self.n_partitions}."
            )
        unknown = set(self.mislabel_methods) - set(self.methods)
        if unknown:
            raise ValueError(
                f"mislabel_methods {sorted(unknown)} are not in methods {sorted(self.methods)}."
            )

    def partition_keys(self) -> list[str]:
        return [f"part-{p:02d}" for p in range(self.n_partitions)]

    def digest(self) -> str:
        spec = {k: v for k, v in asdict(self).items() if k not in ("methods", "mislabel_methods")}
        return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=6).hexdigest()


def build_quality_assets(
    workload: Workload, retrain: RetrainFunction, settings: QualitySettings | None = None
) -> list[dg.AssetsDefinition]:
    """The quality assets of ``workload``; ``retrain(x, y, seed)`` trains a fresh model on a
    training subset the way the workload's checkpoint was trained."""
    settings = settings or QualitySettings()
    test_set = settings.test_set or next(iter(workload.test_sets))
    if test_set not in workload.test_sets:
        raise ValueError(f"test_set {test_set!r} is not one of {sorted(workload.test_sets)}.")
    partitions = dg.StaticPartitionsDefinition(settings.partition_keys())
    dtype = torch.float64 if settings.float64 else None

    def data() -> tuple[ShardData, ShardData]:
        return workload.fit_data(), workload.test_set(test_set)

    def as_dtype(part: ShardData) -> ShardData:
        return ShardData(part.x.to(dtype), part.y, part.ids) if dtype is not None else part

    def table_prefix(train: ShardData, test: ShardData) -> str:
        fp = tensors_fingerprint([("x", train.x), ("y", train.y), ("tx", test.x), ("ty", test.y)])
        return f"retrained-{settings.digest()}-{fp[:12]}"

    def masks_for(train: ShardData) -> np.ndarray:
        return sample_subsets(len(train), settings.n_subsets, settings.fraction, settings.seed)

    @dg.asset(
        name="quality_retrained",
        group_name=GROUP,
        partitions_def=partitions,
        kinds={"pytorch", "parquet"},
        description="Test losses of the model retrained on random training subsets (LDS).",
    )
    def quality_retrained(
        context: dg.AssetExecutionContext, store: InfluenceStoreResource
    ) -> dg.MaterializeResult:
        tables = QualityTables(store)
        train, test = data()
        name = f"{table_prefix(train, test)}/{context.partition_key}"
        existing = tables.read(name)
        if existing is not None:
            return dg.MaterializeResult(
                metadata={"reused": True, "dagster/row_count": len(existing)}
            )
        index = settings.partition_keys().index(context.partition_key)
        subsets = list(range(index, settings.n_subsets, settings.n_partitions))
        table = retrain_subsets(
            retrain,
            train,
            test,
            masks_for(train),
            subsets,
            (settings.seed, settings.ceiling_seed),
            workload.loss,
        )
        uri = tables.write(name, table)
        return dg.MaterializeResult(
            metadata={
                "reused": False,
                "subsets": dg.MetadataValue.json(subsets),
                "retrained_models": len(subsets) * 2,
                "dagster/uri": uri,
                "dagster/row_count": len(table),
            }
        )

    @dg.asset(
        name="attribution_lds",
        group_name=GROUP,
        deps=[quality_retrained],
        kinds={"pytorch", "parquet"},
        description="LDS per method with its bootstrap interval and the seed-to-seed ceiling; "
        "time, peak memory and agreement with Direct.",
    )
    def attribution_lds(store: InfluenceStoreResource) -> dg.MaterializeResult:
        tables = QualityTables(store)
        train, test = data()
        prefix = table_prefix(train, test)
        parts = [tables.read(f"{prefix}/{key}") for key in settings.partition_keys()]
        missing = [k for k, p in zip(settings.partition_keys(), parts, strict=True) if p is None]
        if missing:
            raise dg.Failure(description=f"quality_retrained partitions {missing} are missing.")
        long = pd.concat(parts, ignore_index=True)
        ids = test.ids.numpy()
        actual = actual_losses(long, settings.seed, settings.n_subsets, ids)
        ceiling = actual_losses(long, settings.ceiling_seed, settings.n_subsets, ids)
        model = workload.load_model()
        if dtype is not None:
            model = model.to(dtype)
        table = compare_methods(
            model,
            workload.loss,
            as_dtype(train),
            as_dtype(test),
            settings.methods,
            masks_for(train),
            actual,
            ceiling,
        )
        uri = tables.write("lds", table)
        summary = (
            f"**LDS** on `{test_set}`: {settings.n_subsets} subsets (α = {settings.fraction}), "
            f"{2 * settings.n_subsets} retrained models (seeds {settings.seed} and "
            f"{settings.ceiling_seed}).\n\n"
            + frame_to_markdown(table.round(4), len(table))
            + "\n\n"
            + markdown_image(bar_png(table, "lds", "LDS (Spearman, mean over test points)"), "lds")
        )
        best = table[table.method != "retrain, another seed (ceiling)"]
        return dg.MaterializeResult(
            metadata={
                "summary": dg.MetadataValue.md(summary),
                "lds": dg.MetadataValue.json(
                    {r.method: round(float(r.lds), 4) for r in table.itertuples()}
                ),
                "best_method": str(best.loc[best.lds.idxmax(), "method"]),
                "dagster/uri": uri,
                "dagster/row_count": len(table),
            }
        )

    @dg.asset(
        name="mislabel_metrics",
        group_name=GROUP,
        kinds={"pytorch", "parquet"},
        description="How well each ranking and each audit flag finds the known corrupted labels.",
    )
    def mislabel_metrics(store: InfluenceStoreResource) -> dg.MaterializeResult:
        if workload.known_mislabeled is None:
            raise dg.Failure(
                description=f"Workload {workload.name!r} records no known corrupted labels."
            )
        artifacts, tables = store.open(), QualityTables(store)
        train = as_dtype(workload.fit_data())
        known = set(int(i) for i in workload.known_mislabeled())
        corrupted = np.isin(train.ids.numpy(), list(known))
        model = workload.load_model()
        if dtype is not None:
            model = model.to(dtype)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(train.x, train.y), batch_size=workload.batch_size
        )
        loss = per_sample_losses(model, workload.loss, train.x, train.y)
        rankings: dict[str, np.ndarray] = {"loss": loss}
        for name in settings.mislabel_methods:
            influence = settings.methods[name].build(model, workload.loss).fit(loader)
            rankings[f"self_influence:{name}"] = self_influences(influence, train.x, train.y)
        first = (
            rankings[f"self_influence:{settings.mislabel_methods[0]}"]
            if settings.mislabel_methods
            else None
        )
        if first is not None:
            rankings["loo_loss"] = loss + first / len(train)
        audit = artifacts.read_table("audit/latest", missing_ok=True)
        if audit is None and first is not None:
            audit = audit_examples(
                pd.DataFrame(
                    {
                        "train_id": train.ids.numpy(),
                        "self_influence": first,
                        "loss": loss,
                        "mean_influence": 0.0,
                    }
                )
            )
        if audit is not None:
            position = audit.set_index("train_id").suspicion.reindex(train.ids.numpy())
            if position.notna().all():
                rankings["audit suspicion"] = -position.to_numpy(dtype=np.float64)
        rankings["random"] = np.random.default_rng(0).permutation(len(train)).astype(np.float64)
        table = mislabel_report(rankings, corrupted)
        flags = []
        if audit is not None:
            by_id = audit.set_index("train_id")
            for flag in FLAGS:
                if flag in by_id:
                    values = by_id[flag].reindex(train.ids.numpy()).fillna(False).to_numpy(bool)
                    flags.append({"flag": flag, **flag_quality(values, corrupted).to_json()})
        flag_table = pd.DataFrame(flags)
        uri = tables.write("mislabel", table)
        if len(flag_table):
            tables.write("mislabel_flags", flag_table)
        summary = (
            f"**Mislabel detection**: {int(corrupted.sum())} known corrupted labels among "
            f"{len(train):,} training examples.\n\n"
            + frame_to_markdown(table.round(3), len(table))
            + ("\n\n" + frame_to_markdown(flag_table, len(flag_table)) if len(flag_table) else "")
            + "\n\n"
            + markdown_image(mislabel_curve_png(rankings, corrupted), "mislabel curve")
        )
        return dg.MaterializeResult(
            metadata={
                "summary": dg.MetadataValue.md(summary),
                "average_precision": dg.MetadataValue.json(
                    {r.ranking: round(float(r.ap), 4) for r in table.itertuples()}
                ),
                "dagster/uri": uri,
                "dagster/row_count": len(table),
            }
        )

    @dg.asset(
        name="methods_comparison",
        group_name=GROUP,
        deps=[attribution_lds, mislabel_metrics],
        kinds={"pandas", "parquet"},
        description="Per method: time, peak memory, agreement with Direct, LDS, mislabel AP.",
    )
    def methods_comparison(store: InfluenceStoreResource) -> dg.MaterializeResult:
        tables = QualityTables(store)
        lds_table = tables.read("lds")
        if lds_table is None:
            raise dg.Failure(description="attribution_lds has not been materialized yet.")
        mislabel = tables.read("mislabel")
        table = lds_table.copy()
        if mislabel is not None:
            ap = {
                r.ranking.split(":", 1)[1]: float(r.ap)
                for r in mislabel.itertuples()
                if r.ranking.startswith("self_influence:")
            }
            table["mislabel_ap"] = table.method.map(ap)
        uri = tables.write("methods", table)
        summary = (
            "**Methods comparison**\n\n"
            + frame_to_markdown(table.round(4), len(table))
            + "\n\n"
            + markdown_image(bar_png(table, "lds", "LDS"), "methods")
        )
        return dg.MaterializeResult(
            metadata={
                "summary": dg.MetadataValue.md(summary),
                "dagster/uri": uri,
                "dagster/row_count": len(table),
            }
        )

    return [quality_retrained, attribution_lds, mislabel_metrics, methods_comparison]
