"""The assets of the pipeline (built per workload by :func:`build_assets`).

    training_shards (observable source, one partition per training shard)
          │
    block_mapper ──► influence_factors[test_set] ──► influence_scores[test_set|train_shard]
                                                          │
                             data_audit ◄── influence_table[test_set] ◄┘

Every asset writes into the workload's store and returns a ``MaterializeResult`` whose
``DataVersion`` is a digest of what it wrote, so an unchanged re-run leaves everything
downstream fresh. Each asset first checks whether the store already holds its artifact
for the same inputs (same fitted state, test data, shard data, factors) and then reuses
it instead of computing it again. Checks that would poison downstream assets are blocking.
"""

import datetime as _dt
import json
import time
from collections.abc import Sequence
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import torch

from ..analysis.audit import FLAGS, audit_examples, compare_audits, known_mislabeled_found
from ..analysis.markdown import frame_to_markdown
from ..analysis.plots import audit_plot, markdown_image, score_histogram
from ..analysis.tables import influence_tables, label_map
from ..influence import TorchBatch
from ..influence.layer_gradients import per_example_losses
from ..quality.mislabel import checkpoint_loss
from ..store import Provenance, ShardSpec, validate_name
from ..store.provenance import model_fingerprint
from ..workload import Workload
from .automation import automation_condition
from .config import AuditConfig, FactorsConfig, ScoringConfig, TableConfig, method_config_class
from .resources import InfluenceStoreResource
from .runtime import (
    combine,
    data_fingerprint,
    fail_clearly,
    fit_fingerprint,
    resolve_device,
    restore,
)

#: Bump an asset's version when a change of its code changes what it writes.
CODE_VERSIONS = {
    "block_mapper": "1",
    "influence_factors": "1",
    "influence_scores": "1",
    "influence_table": "1",
    "data_audit": "1",
}
GROUP = "influence"


def _schema(frame: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(str(c), str(t)) for c, t in frame.dtypes.items()])


def _registered_shards(context: Any, workload: Workload, partitions_name: str) -> list[str]:
    """The registered training shards that exist and hold at least one row (an empty shard
    is skipped with a warning: it has nothing to score, fit or tabulate)."""
    registered = context.instance.get_dynamic_partitions(partitions_name)
    available = set(workload.shards.names())
    shards = []
    for shard in registered:
        if shard not in available:
            continue
        if workload.shards.size(shard) == 0:
            context.log.warning(f"Training shard {shard!r} has no rows: skipped.")
            continue
        shards.append(shard)
    return shards


def _query_rank(context: Any, workload: Workload) -> int | None:
    """The query rank of the current block mapper's method (the config its latest
    materialization recorded, so a Launchpad choice carries over; else the workload's)."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("block_mapper"))
    materialization = None if event is None else event.asset_materialization
    if materialization is not None:
        config = materialization.metadata.get("config")
        value = getattr(config, "value", None)
        if isinstance(value, dict) and "query_rank" in value:
            rank = value["query_rank"]
            return None if rank is None else int(rank)
    return workload.method.query_rank


def _non_finite_factors(artifacts: Any, test_set: str, record: dict[str, Any]) -> int:
    """How many stored factor values of ``test_set`` are NaN or inf (query factors are
    read one row block at a time)."""
    if record.get("kind") != "query":
        values, _ = artifacts.read_factors(test_set)
        return int((~np.isfinite(values)).sum())
    count = 0
    for _, block in artifacts.query_factors(test_set).blocks():
        for tensor in block.tensors().values():
            count += int((~torch.isfinite(tensor)).sum())
    return count


def build_assets(
    workload: Workload,
    test_sets_def: dg.StaticPartitionsDefinition,
    shards_def: dg.DynamicPartitionsDefinition,
    scores_def: dg.MultiPartitionsDefinition,
    gpu: bool = False,
    shards_per_run: int = 16,
) -> list[Any]:
    """The source asset, the five assets and their in-asset checks for ``workload``; with
    ``gpu`` the scoring step is in pool ``gpu`` (one at a time on the accelerator); a
    backfill scores up to ``shards_per_run`` partitions per run."""
    MethodConfig = method_config_class(workload.method)
    condition = automation_condition()
    shards_name = str(shards_def.name)

    # ------------------------------------------------------------------ training shards
    @dg.observable_source_asset(
        name="training_shards",
        partitions_def=shards_def,
        group_name=GROUP,
        description=f"Training shards of workload {workload.name!r} "
        f"({workload.shards.describe()}); the data version of a shard is its fingerprint, "
        "reported by training_shard_sensor.",
    )
    def training_shards(context: dg.AssetExecutionContext) -> dg.DataVersionsByPartition:
        names = _registered_shards(context, workload, shards_name)
        return dg.DataVersionsByPartition(
            {name: dg.DataVersion(workload.shards.fingerprint(name)) for name in names}
        )

    # ------------------------------------------------------------------ block mapper
    fit_mapping: Any = (
        dg.AllPartitionMapping()
        if workload.fit_shards is None
        else dg.SpecificPartitionsPartitionMapping(list(workload.fit_shards))
    )

    @dg.asset(
        name="block_mapper",
        group_name=GROUP,
        # the fit shards are its upstream: a changed fit shard shows it stale (and requests
        # it) before anything runs
        deps=[dg.AssetDep(training_shards, partition_mapping=fit_mapping)],
        code_version=f"{CODE_VERSIONS['block_mapper']}+{workload.method.digest()}",
        automation_condition=automation_condition(on_observed_sources=True),
        kinds={"pytorch", "zarr"},
        description="The influence method fitted on the fit shards: the block-wise inverse "
        "curvature, persisted in the store (tensors + JSON, no pickle).",
    )
    @fail_clearly
    def block_mapper(
        context: dg.AssetExecutionContext,
        config: MethodConfig,  # type: ignore[valid-type]  # built per workload (defaults)
        store: InfluenceStoreResource,
    ) -> dg.MaterializeResult:
        start = time.perf_counter()
        spec = config.spec()  # type: ignore[attr-defined]
        device = resolve_device(config.device)  # type: ignore[attr-defined]
        model = workload.load_model(device)
        influence = spec.build(model, workload.loss)
        fit_fp = fit_fingerprint(workload)
        wanted = Provenance.of(influence, fit=fit_fp)
        artifacts = store.open()
        info = artifacts.block_mapper_info()
        reused = False
        if info is not None:
            stored = Provenance.from_json(info["provenance"])
            same = all(
                json.dumps(getattr(stored, f), sort_keys=True, default=str)
                == json.dumps(getattr(wanted, f), sort_keys=True, default=str)
                for f in Provenance.IDENTITY
            )
            reused = same and stored.data_fingerprints.get("fit") == fit_fp
        if reused:
            assert info is not None
            digest = info["digest"]
            context.log.info(f"The stored block mapper {digest} matches: nothing to fit.")
        else:
            fit = workload.fit_data()
            context.log.info(f"Fitting {spec.method} on {len(fit)} examples ({device}).")
            influence.fit(fit.fit_loader(workload.batch_size))
            digest = artifacts.save_block_mapper(influence, fit_data_fingerprint=fit_fp)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(digest),
            metadata={
                "digest": digest,
                "reused": reused,
                "method": spec.method,
                "config": dg.MetadataValue.json(spec.to_json()),
                "blocks": dg.MetadataValue.json(dict(influence.block_sizes)),
                "n_parameters": influence.n_parameters,
                "fit_shards": dg.MetadataValue.json(workload.fit_shard_names()),
                "model_fingerprint": model_fingerprint(model),
                "device": str(device),
                "seconds": round(time.perf_counter() - start, 3),
                "dagster/uri": artifacts.url,
            },
        )

    # ------------------------------------------------------------------ factors
    @dg.asset(
        name="influence_factors",
        group_name=GROUP,
        partitions_def=test_sets_def,
        deps=[block_mapper],
        # a query rank set in the workload's method is part of what the factors are
        code_version=CODE_VERSIONS["influence_factors"]
        + ("" if workload.method.query_rank is None else f"+q{workload.method.query_rank}"),
        automation_condition=condition,
        kinds={"pytorch", "zarr"},
        check_specs=[
            dg.AssetCheckSpec(
                "factors_finite",
                asset="influence_factors",
                blocking=True,
                description="every stored factor is finite",
            ),
            dg.AssetCheckSpec(
                "factors_match_block_mapper",
                asset="influence_factors",
                blocking=True,
                description="the factors were computed with the current block mapper",
            ),
        ],
        description="Inverse-curvature-transformed test gradients A⁻¹∇ℓ(z_test), (n_test, P), "
        "chunked along test rows in the store.",
    )
    @fail_clearly
    def influence_factors(
        context: dg.AssetExecutionContext, config: FactorsConfig, store: InfluenceStoreResource
    ) -> dg.MaterializeResult:
        start = time.perf_counter()
        test_set = context.partition_key
        artifacts = store.open()
        info = artifacts.block_mapper_info()
        if info is None:
            raise dg.Failure(
                description="No block mapper in the store: materialize block_mapper first."
            )
        data = workload.test_set(test_set)
        test_fp = data_fingerprint(data)
        record = None
        if test_set in artifacts.test_sets():
            try:
                record = artifacts.factors_record(test_set)
            except ValueError:
                record = None
        query_rank = _query_rank(context, workload)
        kind = "dense" if query_rank is None else "query"
        reused = (
            record is not None
            and record.get("block_mapper_digest") == info["digest"]
            and record.get("data_fingerprint") == test_fp
            and record.get("dtype") == config.dtype.value
            and record.get("kind", "dense") == kind
            and (query_rank is None or record.get("rank") == query_rank)
        )
        device = resolve_device(config.device)
        if not reused:
            influence = restore(artifacts, workload, device, workload.batch_size)
            write: Any = artifacts.write_factors
            extra: dict[str, Any] = {}
            if query_rank is not None:
                if not hasattr(influence, "compressed_factors"):
                    raise ValueError(
                        f"query_rank={query_rank} needs an EK-FAC block mapper, the stored one "
                        f"is {info['provenance']['method']}: materialize block_mapper again."
                    )
                write, extra = artifacts.write_query_factors, {"rank": query_rank}
            record = write(
                test_set,
                influence,
                data.loader(config.batch_size),
                dtype=config.dtype.value,
                n_rows=len(data),
                annotations={"block_mapper_digest": info["digest"]},
                **extra,
            )
        assert record is not None
        # allocate every registered shard once, here, before the scoring partitions fan out
        shards = _registered_shards(context, workload, shards_name)
        allocation = artifacts.allocate_shards(
            test_set, [ShardSpec(s, workload.shards.size(s)) for s in shards]
        )
        non_finite = _non_finite_factors(artifacts, test_set, record)
        stored = Provenance.from_json(record["provenance"])
        current = Provenance.from_json(info["provenance"])
        differences = [
            f
            for f in Provenance.IDENTITY
            if json.dumps(getattr(stored, f), sort_keys=True, default=str)
            != json.dumps(getattr(current, f), sort_keys=True, default=str)
        ]
        itemsize = np.dtype(record["dtype"]).itemsize
        dense_bytes = int(record["n_rows"]) * int(record["n_parameters"]) * itemsize
        shape_info: dict[str, Any] = {
            "kind": record.get("kind", "dense"),
            "nbytes": int(record.get("nbytes", dense_bytes)),
            "dense_nbytes": dense_bytes,
        }
        if record.get("kind") == "query":
            shape_info.update(
                rank=record.get("rank"),
                fisher=record.get("fisher"),
                modules=dg.MetadataValue.json(list(record["modules"])),
            )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(record["factors_fingerprint"]),
            metadata={
                "test_set": test_set,
                "shape": dg.MetadataValue.json(
                    [int(record["n_rows"]), int(record["n_parameters"])]
                ),
                **shape_info,
                "dtype": record["dtype"],
                "reused": reused,
                "block_mapper_digest": info["digest"],
                "data_fingerprint": test_fp,
                "allocated_shards": len(allocation["order"]),
                "device": str(device),
                "seconds": round(time.perf_counter() - start, 3),
                "dagster/row_count": int(record["n_rows"]),
                "dagster/uri": f"{artifacts.url}/factors/{test_set}",
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="factors_finite",
                    passed=non_finite == 0,
                    metadata={"non_finite": non_finite},
                ),
                dg.AssetCheckResult(
                    check_name="factors_match_block_mapper",
                    passed=not differences,
                    metadata={"differing_fields": dg.MetadataValue.json(differences)},
                ),
            ],
        )

    # ------------------------------------------------------------------ scores
    @dg.asset(
        name="influence_scores",
        group_name=GROUP,
        partitions_def=scores_def,
        deps=[
            dg.AssetDep(
                influence_factors,
                partition_mapping=dg.MultiToSingleDimensionPartitionMapping("test_set"),
            ),
            dg.AssetDep(
                training_shards,
                partition_mapping=dg.MultiToSingleDimensionPartitionMapping("train_shard"),
            ),
        ],
        code_version=CODE_VERSIONS["influence_scores"],
        automation_condition=condition,
        pool="gpu" if gpu else None,
        retry_policy=dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL),
        # a backfill (the UI's Materialize all, automation) scores up to shards_per_run
        # partitions per run: the model is restored once and Dagster's per-run cost shared
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=shards_per_run),
        kinds={"pytorch", "zarr"},
        check_specs=[
            dg.AssetCheckSpec(
                "scores_finite",
                asset="influence_scores",
                blocking=True,
                description="every stored score of the shard is finite (via the per-example "
                "min/max the writer stored)",
            ),
            dg.AssetCheckSpec(
                "scores_spot_check",
                asset="influence_scores",
                blocking=True,
                description="a few stored scores equal a direct recomputation",
            ),
        ],
        description="Scores of one training shard against one test set: its own column "
        "range of the (n_test, n_train) scores array, its top-k and per-example statistics. "
        "One run scores one partition or a range of them.",
    )
    @fail_clearly
    def influence_scores(
        context: dg.AssetExecutionContext, config: ScoringConfig, store: InfluenceStoreResource
    ) -> dg.MaterializeResult:
        start = time.perf_counter()
        artifacts = store.open()
        device = resolve_device(config.device)
        influence = restore(artifacts, workload, device, workload.batch_size)  # once per run
        parts, shapes = [], {}
        for key in context.partition_keys:  # one key, or a range (BackfillPolicy.multi_run)
            keys = scores_def.get_partition_key_from_str(str(key)).keys_by_dimension
            test_set = validate_name(keys["test_set"], "test set partition key")
            shard = validate_name(keys["train_shard"], "training shard partition key")
            if test_set not in shapes:  # a shard's examples must look like the test points
                shapes[test_set] = tuple(workload.test_set(test_set).x.shape[1:])
            part = _score_shard(
                artifacts, workload, influence, test_set, shard, config, device, shapes[test_set]
            )
            parts.append(part)
            what = "reused" if part["reused"] else f"scored on {device}"
            if part["n_rows"] == 0:
                what = "empty: skipped"
                context.log.warning(f"Training shard {shard!r} has no rows: nothing to score.")
            context.log.info(f"{test_set}|{shard}: {part['n_rows']} rows, {what}")
        return _scores_result(parts, artifacts.url, str(device), time.perf_counter() - start)

    # ------------------------------------------------------------------ table
    @dg.asset(
        name="influence_table",
        group_name=GROUP,
        partitions_def=test_sets_def,
        deps=[
            dg.AssetDep(
                influence_scores,
                partition_mapping=dg.MultiToSingleDimensionPartitionMapping("test_set"),
            )
        ],
        code_version=CODE_VERSIONS["influence_table"],
        automation_condition=condition,
        kinds={"pandas", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(
                "all_shards_present",
                asset="influence_table",
                blocking=True,
                description="every registered training shard is scored for the test set",
            ),
        ],
        description="Parquet tables of a test set: the most helpful and most harmful training "
        "examples of every test point (top_k) and per-training-example totals (train_totals).",
    )
    @fail_clearly
    def influence_table(
        context: dg.AssetExecutionContext, config: TableConfig, store: InfluenceStoreResource
    ) -> dg.MaterializeResult:
        start = time.perf_counter()
        test_set = context.partition_key
        artifacts = store.open()
        registered = _registered_shards(context, workload, shards_name)
        status = artifacts.status(test_set)[test_set]
        missing = [s for s in registered if s not in status["complete"]]
        # the training data is the registered shards that still exist: scores of a shard
        # removed from the workload stay in the store but leave the tables
        current = set(registered)
        complete = [s for s in status["complete"] if s in current]
        if not complete:
            raise dg.Failure(description=f"No training shard of {test_set!r} is scored yet.")
        test = workload.test_set(test_set)
        train_labels: dict[int, int] = {}
        for shard in complete:
            part = workload.shards.load(shard)
            train_labels.update(label_map(part.ids.numpy(), part.y.numpy()) or {})
        top, totals = influence_tables(
            artifacts,
            test_set,
            config.top_k,
            train_labels or None,
            label_map(test.ids.numpy(), test.y.numpy()),
            allow_incomplete=True,  # a missing shard fails the blocking check below
            shards=complete,
        )
        top_uri = artifacts.write_table(f"{test_set}/top_k", top)
        totals_uri = artifacts.write_table(f"{test_set}/train_totals", totals)
        sample = _score_sample(artifacts, test_set, complete)
        plot = score_histogram(sample, f"{test_set}: influence scores ({len(sample):,} sampled)")
        records = [artifacts.shard_record(test_set, s) or {} for s in complete]
        version = combine(
            *sorted(f"{r.get('data_fingerprint')}:{r.get('factors_fingerprint')}" for r in records)
        )
        harmful = top[top.kind == "harmful"].head(10)
        preview = (
            f"**{test_set}**: {len(complete)} shards, {len(totals):,} training examples, "
            f"{top.test_id.nunique():,} test points\n\n"
            f"Most harmful (first rows):\n\n{frame_to_markdown(harmful, 10)}\n\n"
            "Training examples that hurt most overall:\n\n"
            f"{frame_to_markdown(totals.head(10), 10)}\n\n"
            + markdown_image(plot, "score histogram")
        )
        if workload.describe is not None:  # e.g. the GPT example's sequences as text
            first = sorted(top.test_id.unique())[:10]  # the preview stays small
            text = workload.describe(top[top.test_id.isin(first)]).replace("```", "` ` `")
            preview += (
                f"\n\nMost influential training examples of the first {len(first)} test "
                f"points:\n\n```\n{text}\n```"
            )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "test_set": test_set,
                "top_k_path": dg.MetadataValue.path(top_uri),
                "train_totals_path": dg.MetadataValue.path(totals_uri),
                "dagster/uri": top_uri,
                "dagster/row_count": len(top),
                "dagster/column_schema": _schema(top),
                "train_totals_rows": len(totals),
                "train_totals_schema": dg.MetadataValue.table_schema(_schema(totals)),
                "shards": dg.MetadataValue.json(complete),
                "preview": dg.MetadataValue.md(preview),
                "seconds": round(time.perf_counter() - start, 3),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="all_shards_present",
                    passed=not missing,
                    metadata={"missing": dg.MetadataValue.json(missing)},
                ),
            ],
        )

    # ------------------------------------------------------------------ audit
    @dg.asset(
        name="data_audit",
        group_name=GROUP,
        deps=[influence_table],
        # a workload that gains (or loses) training checkpoints ranks differently
        code_version=CODE_VERSIONS["data_audit"] + ("+checkpoints" if workload.checkpoints else ""),
        automation_condition=condition,
        kinds={"pandas", "parquet"},
        description="Flagged training examples (likely mislabeled, high self-influence, high "
        "loss, harmful) with reasons, and what changed since the previous audit.",
    )
    @fail_clearly
    def data_audit(
        context: dg.AssetExecutionContext, config: AuditConfig, store: InfluenceStoreResource
    ) -> dg.MaterializeResult:
        start = time.perf_counter()
        artifacts = store.open()
        shards = _registered_shards(context, workload, shards_name)
        device = resolve_device(config.device)
        info = artifacts.block_mapper_info()
        if info is None:
            raise dg.Failure(description="No block mapper in the store.")
        examples, images, computed = _audit_examples(
            artifacts, workload, shards, info["digest"], device, config.batch_size
        )
        means = []
        for test_set in workload.test_sets:
            totals = artifacts.read_table(f"{test_set}/train_totals", missing_ok=True)
            if totals is None:
                raise dg.Failure(
                    description=f"influence_table[{test_set}] has not been written yet."
                )
            means.append(totals.set_index("train_id").score_mean.rename(test_set))
        per_test = pd.concat(means, axis=1)
        examples = examples.join(per_test, on="train_id")
        examples["mean_influence"] = examples[list(workload.test_sets)].mean(axis=1)
        audit = audit_examples(examples.dropna(subset=["mean_influence"]), fence=config.fence)
        known = set(workload.known_mislabeled()) if workload.known_mislabeled else None
        if known is not None:
            audit["known_mislabeled"] = audit.train_id.isin(known)
        previous = artifacts.read_table("audit/latest", missing_ok=True)
        changes = compare_audits(previous, audit)
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        latest_uri = artifacts.write_table("audit/latest", audit)
        artifacts.write_table(f"audit/history-{stamp}", audit)
        summary = audit_summary(audit, changes.to_json(), known)
        plot = audit_plot(audit, images)
        counts = {flag: int(audit[flag].sum()) for flag in FLAGS}
        metadata: dict[str, Any] = {
            "summary": dg.MetadataValue.md(summary + "\n\n" + markdown_image(plot, "audit")),
            "flag_counts": dg.MetadataValue.json(counts),
            "changes": dg.MetadataValue.json(changes.to_json()),
            "audited": len(audit),
            "self_influence_computed_for": dg.MetadataValue.json(computed),
            "dagster/uri": latest_uri,
            "dagster/row_count": len(audit),
            "dagster/column_schema": _schema(audit),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if known is not None:
            metadata["known_mislabeled"] = dg.MetadataValue.json(
                known_mislabeled_found(audit, known)
            )
        version = combine(*(f"{i}:{f}" for i, f in zip(audit.train_id, audit.flagged, strict=True)))
        return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata=metadata)

    return [
        training_shards,
        block_mapper,
        influence_factors,
        influence_scores,
        influence_table,
        data_audit,
    ]


def _score_shard(
    artifacts: Any,
    workload: Workload,
    influence: Any,
    test_set: str,
    shard: str,
    config: ScoringConfig,
    device: torch.device,
    example_shape: tuple[int, ...],
) -> dict[str, Any]:
    """Score one shard against one test set's factors (or reuse the stored scores made from
    the same shard data and factors) and check the result: every stored score finite, and a
    few stored scores equal to a recomputation. Returns the partition's summary. A shard
    whose examples do not have ``example_shape`` is a data error (ValueError, not retried);
    an empty shard is skipped."""
    record = artifacts.factors_record(test_set)
    data = workload.shards.load(shard)
    shard_fp = data_fingerprint(data)
    if tuple(data.x.shape[1:]) != example_shape:
        raise ValueError(
            f"Training shard {shard!r} ({workload.shards.describe()}): x has shape "
            f"{tuple(data.x.shape)}, expected (n, {', '.join(map(str, example_shape))}) like "
            f"the points of test set {test_set!r}."
        )
    if len(data) == 0:
        return {
            "partition": f"{test_set}|{shard}",
            "n_rows": 0,
            "columns": [0, 0],
            "reused": False,
            "data_fingerprint": shard_fp,
            "data_version": combine(record["factors_fingerprint"], shard_fp),
            "finite": True,
            "spot_error": 0.0,
            "checked": 0,
        }
    # allocated before the fan-out by influence_factors; a late shard only where safe
    artifacts.ensure_allocated(test_set, shard, len(data))
    # verify: a lost or corrupt chunk makes the shard incomplete, so it is scored again
    existing = artifacts.shard_record(test_set, shard, verify=True)
    reused = (
        existing is not None
        and existing.get("data_fingerprint") == shard_fp
        and existing.get("factors_fingerprint") == record["factors_fingerprint"]
        and existing.get("top_k", 0) >= config.top_k
    )
    if not reused:
        extra = {"query_rank": record.get("rank")} if record.get("kind") == "query" else {}
        artifacts.write_shard_scores(
            test_set,
            shard,
            influence,
            data.loader(config.batch_size),
            top_k=config.top_k,
            **extra,
        )
        existing = artifacts.shard_record(test_set, shard)
    assert existing is not None
    begin, end = existing["columns"]
    # Every stored score is finite iff every column's min and max over the test points
    # are (a NaN or inf makes its column's min or max NaN/inf). The writer computed them
    # from the very blocks it wrote, and crc32c vouches for the bytes, so this covers
    # all n_test x n_rows values at the cost of reading 2 x n_rows numbers.
    low = artifacts._read(f"train_stats/{test_set}/{shard}/min", ...)
    high = artifacts._read(f"train_stats/{test_set}/{shard}/max", ...)
    finite = bool(np.isfinite(low).all() and np.isfinite(high).all()) and len(low) == len(data)
    # spot-check: stored scores against a recomputation from the stored factors
    rows = sorted({0, len(data) // 2, len(data) - 1})[: config.spot_checks]
    n_test = int(record["n_rows"])
    tests = sorted({0, n_test // 2, n_test - 1})[: config.spot_checks]
    if record.get("kind") == "query":  # per-layer factors: read only the checked rows
        chosen: Any = (
            artifacts.query_factors(test_set)
            .select(tests)
            .to(influence.model_device, influence.model_dtype)
        )
    else:
        factors, _ = artifacts.read_factors(test_set)
        chosen = torch.from_numpy(factors[tests]).to(device)
    recomputed = (
        influence.influences_from_factors(chosen, data.x[rows], data.y[rows]).double().cpu().numpy()
    )
    selection = (np.asarray(tests), np.asarray([begin + r for r in rows]))
    stored = np.asarray(artifacts.read_scores(test_set, *selection), dtype=np.float64)
    error = float(np.abs(stored - recomputed).max() / max(np.abs(recomputed).max(), 1e-30))
    return {
        "partition": f"{test_set}|{shard}",
        "n_rows": len(data),
        "columns": [int(begin), int(end)],
        "reused": reused,
        "score_min": float(existing["score_min"]),
        "score_max": float(existing["score_max"]),
        "data_fingerprint": shard_fp,
        "data_version": combine(record["factors_fingerprint"], shard_fp),
        "finite": finite,
        "spot_error": error,
        "checked": len(rows) * len(tests),
    }


def _scores_result(
    parts: Sequence[dict[str, Any]], url: str, device: str, seconds: float
) -> dg.MaterializeResult:
    """The materialization of one scoring run: one partition, or a range of them. A range
    records one data version for all its partitions, the digest of theirs (Dagster keeps
    one per run's output); a partition scored alone keeps its own."""
    one = parts[0]
    version = (
        one["data_version"]
        if len(parts) == 1
        else combine(*sorted(f"{p['partition']}:{p['data_version']}" for p in parts))
    )
    test_set, shard = one["partition"].split("|", 1)
    scored = [p for p in parts if p["n_rows"]]
    metadata: dict[str, Any] = {
        "partitions": len(parts),
        "n_rows": sum(p["n_rows"] for p in parts),
        "reused": all(p["reused"] for p in parts),
        "device": device,
        "seconds": round(seconds, 3),
        "dagster/uri": f"{url}/scores/{test_set}",
    }
    if scored:
        metadata["score_min"] = min(p["score_min"] for p in scored)
        metadata["score_max"] = max(p["score_max"] for p in scored)
    if len(parts) == 1:
        metadata.update(
            test_set=test_set,
            train_shard=shard,
            columns=dg.MetadataValue.json(one["columns"]),
            data_fingerprint=one["data_fingerprint"],
        )
    else:
        metadata["per_partition"] = dg.MetadataValue.json(
            {p["partition"]: {k: p[k] for k in ("n_rows", "reused", "data_version")} for p in parts}
        )
    not_finite = [p["partition"] for p in parts if not p["finite"]]
    worst = max(p["spot_error"] for p in parts)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name="scores_finite",
                passed=not not_finite,
                metadata={"not_finite": dg.MetadataValue.json(not_finite)},
            ),
            dg.AssetCheckResult(
                check_name="scores_spot_check",
                passed=worst < 1e-3,
                metadata={
                    "max_relative_error": worst,
                    "checked": sum(p["checked"] for p in parts),
                },
            ),
        ],
    )


def _score_sample(
    artifacts: Any, test_set: str, shards: Sequence[str], limit: int = 200_000
) -> np.ndarray:
    """Up to ``limit`` scores of the complete shards (whole columns, evenly spaced)."""
    allocation = artifacts.allocation(test_set)["shards"]
    columns = np.concatenate(
        [
            np.arange(allocation[s]["start"], allocation[s]["start"] + allocation[s]["n_rows"])
            for s in shards
        ]
    )
    array = artifacts.scores_array(test_set)
    keep = max(1, min(len(columns), limit // max(1, array.shape[0])))
    chosen = np.sort(columns[np.linspace(0, len(columns) - 1, keep).astype(np.int64)])
    return np.asarray(
        artifacts.read_scores(test_set, slice(None), chosen), dtype=np.float64
    ).reshape(-1)


def _audit_examples(
    artifacts: Any,
    workload: Workload,
    shards: Sequence[str],
    digest: str,
    device: torch.device,
    batch_size: int,
) -> tuple[pd.DataFrame, np.ndarray | None, list[str]]:
    """Per training example: id, shard, row, label, self-influence and loss, and where the
    workload saves training checkpoints the mean loss over them (``checkpoint_loss``). Values
    are cached per shard in the store and recomputed only for new or changed shards (or a new
    block mapper; for ``checkpoint_loss``, changed checkpoints)."""
    frames, images, computed = [], [], []
    influence = None
    checkpoints = workload.checkpoint_paths()
    checkpoints_fp = _checkpoints_fingerprint(checkpoints) if checkpoints else None
    for shard in shards:
        data = workload.shards.load(shard)
        fp = data_fingerprint(data)
        cached = artifacts.read_example_values("audit", shard)
        if (
            cached is not None
            and cached[1].get("data_fingerprint") == fp
            and cached[1].get("block_mapper") == digest
        ):
            values = cached[0]
        else:
            if influence is None:
                influence = restore(artifacts, workload, device, workload.batch_size)
            self_influence, losses = [], []
            for start in range(0, len(data), batch_size):
                x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
                self_influence.append(influence.self_influences(x, y).double().cpu().numpy())
                losses.append(_per_example_losses(influence, x, y).double().cpu().numpy())
            values = {
                "ids": data.ids.numpy(),
                "self_influence": np.concatenate(self_influence),
                "loss": np.concatenate(losses),
            }
            artifacts.write_example_values(
                "audit", shard, values, {"data_fingerprint": fp, "block_mapper": digest}
            )
            computed.append(shard)
        frame = pd.DataFrame(
            {
                "train_id": values["ids"].astype(np.int64),
                "train_shard": shard,
                "train_row": np.arange(len(values["ids"]), dtype=np.int64),
                "self_influence": values["self_influence"],
                "loss": values["loss"],
            }
        )
        if checkpoints_fp is not None:
            frame["checkpoint_loss"] = _shard_checkpoint_loss(
                artifacts, workload, shard, data, fp, checkpoints, checkpoints_fp, batch_size
            )
        labels = label_map(data.ids.numpy(), data.y.numpy())
        if labels is not None:
            frame["train_label"] = frame.train_id.map(labels).astype("Int64")
        frames.append(frame)
        images.append(data.x.reshape(len(data), -1).numpy())
    examples = pd.concat(frames, ignore_index=True)
    examples["position"] = np.arange(len(examples))
    flat = np.concatenate(images) if images else None
    side = round(float(np.sqrt(flat.shape[1]))) if flat is not None else 0
    square = flat is not None and side * side == flat.shape[1] and side <= 64
    return examples, (flat if square else None), computed


def _checkpoints_fingerprint(paths: Sequence[Any]) -> str:
    """Changes when the list of checkpoints or any file changes (name, size, modification
    time: cheap for multi-GB checkpoints, like a directory shard's fingerprint)."""
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return combine(*parts)


def _shard_checkpoint_loss(
    artifacts: Any,
    workload: Workload,
    shard: str,
    data: Any,
    data_fp: str,
    checkpoints: Sequence[Any],
    checkpoints_fp: str,
    batch_size: int,
) -> np.ndarray:
    """(n,) a shard's mean per-example loss over the training checkpoints, cached in the
    store under the shard's data fingerprint and the checkpoints' fingerprint (it does not
    depend on the block mapper, so a refit reuses it)."""
    key = {"data_fingerprint": data_fp, "checkpoints": checkpoints_fp}
    cached = artifacts.read_example_values("checkpoint_loss", shard)
    if cached is not None and all(cached[1].get(k) == v for k, v in key.items()):
        return np.asarray(cached[0]["checkpoint_loss"], dtype=np.float64)
    values = checkpoint_loss(
        workload.model_factory, checkpoints, workload.loss, data.x, data.y, batch_size
    )
    artifacts.write_example_values(
        "checkpoint_loss", shard, {"ids": data.ids.numpy(), "checkpoint_loss": values}, key
    )
    return values


def _per_example_losses(influence: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's loss: for EK-FAC (any model it takes: (B, C), (B, T, V) or ``.logits``
    outputs) the engine's convention, a sequence's loss summed over its positions; for the
    other methods their gradient provider's."""
    if not hasattr(influence, "compressed_factors"):
        return influence.full_gradient_provider().per_sample_losses(TorchBatch(x, y))
    device = influence.model_device
    with torch.no_grad():
        output = influence.model(x.to(device))
        logits = getattr(output, "logits", output)
        return per_example_losses(influence.loss, logits, y.to(device))


def audit_summary(audit: pd.DataFrame, changes: dict[str, Any], known: set[int] | None) -> str:
    """A markdown summary of an audit."""
    counts = {flag: int(audit[flag].sum()) for flag in FLAGS}
    lines = [
        f"**Data audit**: {len(audit):,} training examples audited, "
        f"{int(audit.flagged.sum())} flagged.",
        "",
        "| flag | examples |",
        "|---|---|",
        *[f"| {flag} | {n} |" for flag, n in counts.items()],
        "",
    ]
    if known is not None:
        found = known_mislabeled_found(audit, known)
        lines.append(
            f"**Known mislabeled examples found**: {found['found_in_top']} of {found['known']} "
            f"are among the top {found['top']} flagged examples; "
            f"{found['known_among_likely_mislabeled']} of {found['known']} are flagged "
            f"likely_mislabeled ({found['likely_mislabeled']} flags)."
        )
        lines.append("")
    if changes.get("first_audit"):
        lines.append("First audit: no previous audit to compare with.")
    else:
        lines.append(
            f"Since the previous audit: {len(changes['newly_flagged'])} newly flagged, "
            f"{len(changes['no_longer_flagged'])} no longer flagged, {changes['newly_audited']} "
            f"newly audited examples."
        )
    columns = [
        "suspicion",
        "train_id",
        "train_shard",
        *(["train_label"] if "train_label" in audit else []),
        "self_influence",
        "loss",
        "mean_influence",
        "reasons",
    ]
    lines += ["", "Top flagged examples:", "", frame_to_markdown(audit[audit.flagged][columns], 15)]
    return "\n".join(lines)
