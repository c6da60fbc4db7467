"""`vlp-data`: build a weakly aligned image-text corpus by retrieval (Apache Beam).

Arguments this CLI does not know go to Beam's PipelineOptions (--runner, --direct_num_workers,
--project, --region, --temp_location, ...). Locally the default runner is FnApiRunner.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# TOKENIZERS_PARALLELISM is left to encoding.load_sentence_model, which knows the device (on for cuda)

from pipelines.corpus_cache import GIB  # noqa: E402
from pipelines.files import check_patterns_match, is_local  # noqa: E402
from pipelines.metrics import STAGE_TIME  # noqa: E402
from pipelines.fingerprint import CACHE_ENV  # noqa: E402
from pipelines.options import (CPU_SBERT_BACKEND, CPU_SBERT_BACKEND_WITHOUT_VNNI, CUDA_EMBED_BATCH_SIZE,  # noqa: E402
                               DEVICES, INDEX_TYPES, REGION_MODES, SBERT_BACKENDS, BuildOptions, DetectOptions,
                               EmbedOptions, LinkOptions, PhraseOptions, RetrieveOptions, ShardOptions, TextOptions, field_default)

BEAM_PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


class RunError(click.ClickException):
    """A failure the user can act on: printed as one clear message, exit code 1."""


WAIT_HELP = ("Wait for the job and print its summary. --no-wait returns once a remote runner has accepted the "
             "job (a Dataflow flex template launch must): the job checks and publishes its output itself.")
OVERWRITE_HELP = ("Write into a non-empty --output folder that vlp-data did not write; its files named like "
                  "the outputs (stats.json, shards/, ...) are replaced.")


def claim_output(output: str, overwrite: bool) -> None:
    """The output folder is checked (and marked as ours) before anything runs."""
    from pipelines import build
    try:
        build.claim_output(output, overwrite)
    except build.OutputError as err:
        raise RunError(str(err)) from err


# Runners that run on this machine; any other (DataflowRunner, a portable job server, ...) runs the
# job elsewhere, where this machine's paths do not exist.
LOCAL_RUNNERS = {"fnapirunner", "directrunner", "bundlebaseddirectrunner", "switchingdirectrunner", "prismrunner"}


def runner_name(beam_args: list[str]) -> str:
    from pipelines.build import beam_options
    from apache_beam.options.pipeline_options import StandardOptions
    runner = beam_options(beam_args).view_as(StandardOptions).runner
    return runner if isinstance(runner, str) else type(runner).__name__


def is_remote_runner(beam_args: list[str]) -> bool:
    return runner_name(beam_args).rsplit(".", 1)[-1].lower() not in LOCAL_RUNNERS


def check_paths_reachable(beam_args: list[str], paths: dict[str, str | None]) -> None:
    """A remote runner's workers cannot read or write this machine's files: every path given
    must be on a shared store (gs://, s3://, ...)."""
    if not is_remote_runner(beam_args):
        return
    for flag, path in paths.items():
        local = [p for p in (path or "").split(",") if p and is_local(p)]
        if local:
            raise RunError(f"{flag} {local[0]!r} is a path on this machine, but --runner {runner_name(beam_args)} runs "
                           f"the job on other machines: give a gs:// (or other shared) path")


def check_inputs(patterns: dict[str, str | None]) -> None:
    """Every input pattern matches a file, checked before the pipeline starts."""
    try:
        for flag, pattern in patterns.items():
            if pattern:
                check_patterns_match(flag, pattern)
    except FileNotFoundError as err:
        raise RunError(str(err)) from err


@click.group(help=__doc__)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level (Beam and the stages).")
def main(verbose: bool):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class FieldOption(click.Option):
    """A flag whose default is an options dataclass field's default (`owner`.`field`), so the
    default is written once, in pipelines/options.py; shown in --help."""

    def __init__(self, param_decls, owner: type, field: str, **attrs):
        self.owner, self.field = owner, field
        attrs.setdefault("show_default", True)
        super().__init__(param_decls, default=field_default(owner, field), **attrs)


def field_option(*param_decls, owner: type, field: str, **attrs):
    return click.option(*param_decls, cls=FieldOption, owner=owner, field=field, **attrs)


def wait_option():
    return click.option("--wait/--no-wait", default=True, show_default=True, help=WAIT_HELP)


def overwrite_option():
    return click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)


def detections_output_options():
    """The flags of every command that writes OUTPUT/detections (detect, convert-detections), defined
    once: --output, --overwrite, --detections-per-file, --wait/--no-wait."""
    flags = [
        click.option("--output", required=True, help="Output directory: detections/*.parquet + rejected/."),
        overwrite_option(),
        field_option("--detections-per-file", owner=ShardOptions, field="detections_per_file", type=click.IntRange(1),
                     help="About this many images' detections (with region features) per Parquet file."),
        wait_option(),
    ]

    def decorate(command):
        for flag in reversed(flags):
            command = flag(command)
        return command
    return decorate


def region_cap_option():
    return field_option("--max-regions", owner=DetectOptions, field="max_regions", type=click.IntRange(1),
                        help="At most this many regions per image, highest score first (the detector's, and "
                             "precomputed detections', which are sorted so and capped).")


# The detector's flags -> DetectOptions fields (--max-regions is region_cap_option).
DETECTOR_FLAGS = {"conf_threshold": "conf_threshold", "nms_threshold": "nms_threshold",
                  "detector_cfg": "cfg", "detector_weights": "weights", "detector_names": "names"}
GRID_FLAGS = {"regions": "regions", "grid_size": "grid_size"}


def detector_options(grid: bool = False):
    """The detector's flags, defined once for every command that runs the detector (with `grid`,
    also --regions and --grid-size). The command receives them as one `detector` argument, a
    DetectOptions; a combination that cannot work is a usage error."""
    flags = [
        region_cap_option(),
        field_option("--conf-threshold", owner=DetectOptions, field="conf_threshold", type=click.FloatRange(0, 1),
                     help="Detector: minimum confidence of a kept box."),
        field_option("--nms-threshold", owner=DetectOptions, field="nms_threshold", type=click.FloatRange(0, 1),
                     help="Detector: IoU threshold of the per-class non-maximum suppression."),
        field_option("--detector-cfg", owner=DetectOptions, field="cfg", type=click.Path(exists=True, dir_okay=False),
                     help="A Darknet YOLO model of your own: its .cfg (with --detector-weights and --detector-names) "
                          "[default: the bundled YOLOv3-tiny]."),
        field_option("--detector-weights", owner=DetectOptions, field="weights",
                     type=click.Path(exists=True, dir_okay=False), help="--detector-cfg's .weights file."),
        field_option("--detector-names", owner=DetectOptions, field="names",
                     type=click.Path(exists=True, dir_okay=False),
                     help="--detector-cfg's class names, one a line (e.g. coco.names)."),
    ]
    names = dict(DETECTOR_FLAGS, max_regions="max_regions")
    if grid:
        names.update(GRID_FLAGS)
        flags += [
            field_option("--regions", owner=DetectOptions, field="regions", type=click.Choice(REGION_MODES),
                         help="detected: the detector's boxes and tags; grid: for images where a detector finds "
                              "nothing (synthetic shapes), the whole image plus a --grid-size x --grid-size grid of "
                              "boxes, pooled from the same feature maps, with no tags (label 'region')."),
            field_option("--grid-size", owner=DetectOptions, field="grid_size", type=click.IntRange(1, 16),
                         help="--regions grid: cells per side."),
        ]

    def decorate(command):
        @functools.wraps(command)
        def with_detector(*args, **kwargs):
            values = {field: kwargs.pop(param) for param, field in names.items()}
            try:  # DetectOptions checks the combination (for every caller, not only this one)
                detector = DetectOptions(**values)
            except ValueError as err:
                raise click.UsageError(str(err)) from err
            return command(*args, detector=detector, **kwargs)

        for flag in reversed(flags):
            with_detector = flag(with_detector)
        return with_detector
    return decorate


@main.command("build-retrieval", context_settings=BEAM_PASSTHROUGH)
@click.option("--detections", help="Precomputed detections: JSONL, Parquet, VinVL predictions.tsv, or Oscar/VinVL X.label.tsv or X.yaml (path, glob, or comma list).")
@click.option("--images", help="Images (jpg/png/webp) or WebDataset tars of images, path or glob; runs the detector.")
@click.option("--text", help="Text corpus: .txt/.txt.gz (a sentence per line) or Parquet with a `text` column; globs allowed.")
@field_option("--output", owner=BuildOptions, field="output", help="Output directory (local or gs://).")
@overwrite_option()
@field_option("--k", owner=RetrieveOptions, field="k", type=click.IntRange(1), help="Sentences retrieved per image.")
@click.option("--sbert-model", type=click.Path(exists=True, file_okay=False), help="A sentence-transformers folder [default: bundled all-MiniLM-L6-v2].")
@click.option("--sbert-backend", type=click.Choice(SBERT_BACKENDS),
              help=f"How sentences are embedded: torch, or ONNX Runtime fp32 / int8 weights / SmoothQuant int8 with "
                   f"GPTQ-rounded weights, the FFN outputs and the last layer fp32 (cpu only; exported from "
                   f"the model folder on first use and cached under ${CACHE_ENV} or ~/.cache/vlp-data) "
                   f"[default: {CPU_SBERT_BACKEND} on a cpu with VNNI, {CPU_SBERT_BACKEND_WITHOUT_VNNI} on other cpus, torch "
                   f"on cuda].")
@click.option("--batch-size", type=click.IntRange(1),
              help=f"Sentences per embedding batch [default: {EmbedOptions.batch_size} on cpu, {CUDA_EMBED_BATCH_SIZE} "
                   f"on cuda].")
@field_option("--device", owner=EmbedOptions, field="device", type=click.Choice(DEVICES), help="Where to embed and search.")
@field_option("--index", "index_type", owner=RetrieveOptions, field="index", type=click.Choice(INDEX_TYPES),
              help="flat: exact inner product; ivf: IndexIVFFlat; ivfpq: IndexIVFPQ (compressed). ivf and ivfpq "
                   "are trained once per run on a sample and memory-mapped by every search process; their "
                   "candidates are re-scored exactly.")
@field_option("--nlist", owner=RetrieveOptions, field="nlist", type=click.IntRange(1), help="ivf, ivfpq: clusters.")
@field_option("--nprobe", owner=RetrieveOptions, field="nprobe", type=click.IntRange(1),
              help="ivf, ivfpq: clusters searched per query.")
@field_option("--pq-bytes", owner=RetrieveOptions, field="pq_bytes", type=click.IntRange(1),
              help="ivfpq: bytes per vector (8-bit sub-quantizers; must divide the embedding width).")
@field_option("--index-train-rows", owner=RetrieveOptions, field="train_rows", type=click.IntRange(1),
              help="ivf, ivfpq: sentences in the training sample.")
@field_option("--corpus-shard-rows", owner=RetrieveOptions, field="corpus_shard_rows", type=click.IntRange(1),
              help="The corpus is written and searched in shards of about this many sentences; a worker maps one at a time.")
@field_option("--corpus-cache-gb", owner=RetrieveOptions, field="corpus_cache_gb",
              type=click.FloatRange(0, min_open=True), show_default="half the temp folder's disk",
              help="Remote corpus shards (gs:// staging) are copied to each worker's disk and kept there up to this "
                   "many GiB, least recently used evicted first (never one a process is using).")
@click.option("--embeddings", "embeddings_dir",
              help="Embedding store (folder, local or gs://): corpus embeddings kept by model fingerprint and "
                   "sentence id, reused by later builds (only sentences it lacks are embedded, then added).")
@click.option("--split-sentences", is_flag=True, help="Split book-like text (paragraphs) into sentences with spaCy.")
@field_option("--max-chars", owner=TextOptions, field="max_chars", type=click.IntRange(1),
              help="Drop longer sentences (counted, dead-lettered).")
@detector_options()
@field_option("--spacy-model", owner=PhraseOptions, field="spacy_model",
              help="spaCy pipeline name or path (noun phrases, sentence splitting).")
@click.option("--word-vectors", help="Word vectors for linking: word2vec .bin/.txt, GloVe .txt, gensim .kv, or 'train' [default: GloVe 6B 50-d].")
@click.option("--trust-pickled-vectors", is_flag=True,
              help="Load a gensim .kv --word-vectors file: a pickle, which runs any code it holds (refused without this).")
@field_option("--link-threshold", owner=LinkOptions, field="threshold", type=float,
              help="Phrases less similar to every region stay unlinked.")
@field_option("--samples-per-shard", owner=ShardOptions, field="samples_per_shard", type=click.IntRange(1),
              help="Images per WebDataset shard.")
@field_option("--table-rows-per-file", owner=ShardOptions, field="table_rows_per_file", type=click.IntRange(1),
              help="Side tables (sentences, retrievals, links): about this many rows per Parquet file.")
@click.option("--no-shards", is_flag=True, help="Retrievals only: skip noun phrases, linking and shards.")
@click.option("--store-images", is_flag=True,
              help="Each shard sample also carries its image, {key}.jpg: resized to --image-size, fixed JPEG settings "
                   "(docs/corpus-format.md). With --detections the images are read from --image-root.")
@field_option("--image-size", owner=BuildOptions, field="image_size", type=click.IntRange(16),
              help="--store-images: the stored image's longer side in pixels (smaller images are not enlarged).")
@click.option("--image-root", help="--store-images with --detections: the folder holding the images; an image id "
                                   "names DIR/{id}, else DIR/{id}.jpg/.jpeg/.png/.webp (local or gs://).")
@wait_option()
@click.pass_context
def build_retrieval(ctx, detections, images, text, output, overwrite, k, sbert_model, sbert_backend, batch_size, device,
                    index_type, nlist, nprobe, pq_bytes, index_train_rows, corpus_shard_rows, corpus_cache_gb, embeddings_dir,
                    split_sentences, max_chars, detector, spacy_model, word_vectors, trust_pickled_vectors,
                    link_threshold, samples_per_shard, table_rows_per_file, no_shards, store_images, image_size,
                    image_root, wait):
    """Detections or images + a text corpus -> top-K sentences per image -> noun phrases linked to
    regions -> WebDataset shards. With no inputs, runs on the bundled sample."""
    from pipelines import build
    if detections and images:
        raise click.UsageError("give --detections or --images, not both")
    sample = not (detections or images or text)
    if sample and (not is_local(output) or is_remote_runner(ctx.args)):
        raise click.UsageError("the bundled sample runs locally: give a local --output and runner, or your own inputs")
    if not sample and not text:
        raise click.UsageError("--text is required when --detections or --images is given")
    if not sample and not (detections or images):
        raise click.UsageError("give --detections or --images with --text")
    remote_default = sbert_backend is None and device == "cpu" and is_remote_runner(ctx.args)
    if remote_default:
        # the default is chosen by the CPU of the machine that builds the options (VNNI or not); a
        # remote runner's workers run on other CPUs, unknown here: the exact backend, unless asked
        sbert_backend = CPU_SBERT_BACKEND_WITHOUT_VNNI
    embed = EmbedOptions(model=sbert_model, device=device, backend=sbert_backend,
                         batch_size=batch_size or (CUDA_EMBED_BATCH_SIZE if device == "cuda" else EmbedOptions.batch_size))
    options = BuildOptions(
        output=output, detections=detections, images=images, text=text, shards=not no_shards, embeddings=embeddings_dir,
        store_images=store_images, image_size=image_size, image_root=image_root,
        text_options=TextOptions(split_sentences=split_sentences, max_chars=max_chars, spacy_model=spacy_model),
        embed=embed,
        retrieve=RetrieveOptions(k=k, index=index_type, nlist=nlist, nprobe=nprobe, device=device, pq_bytes=pq_bytes,
                                 train_rows=index_train_rows, corpus_shard_rows=corpus_shard_rows,
                                 corpus_cache_gb=corpus_cache_gb),
        detect=detector,
        phrases=PhraseOptions(spacy_model=spacy_model),
        link=LinkOptions(word_vectors=word_vectors, trust_pickle=trust_pickled_vectors, threshold=link_threshold),
        shard=ShardOptions(samples_per_shard=samples_per_shard, table_rows_per_file=table_rows_per_file),
    )
    try:  # before anything is written: the same checks the pipeline makes when it is built
        build.check_store_images(options)
        embed.resolved_backend()
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    check_paths_reachable(ctx.args, {"--output": output, "--detections": detections, "--images": images, "--text": text})
    if remote_default:  # said once the arguments are known to be good (an error stays one line)
        click.echo(f"remote runner: embedding with --sbert-backend {sbert_backend} (exact); on workers whose CPU "
                   f"has VNNI (e.g. n2, c2, c3 machine types) --sbert-backend {CPU_SBERT_BACKEND} is ~1.3x faster "
                   "(docs/benchmarks.md)", err=True)
    if not is_dry_run_args(ctx.args):
        check_inputs({"--detections": detections, "--images": images, "--text": text})
        claim_output(output, overwrite)  # before the sample is written into it
    if sample:
        from pipelines.sample import prepare_sample
        images, text = prepare_sample(os.path.join(output, ".sample-input"))
        click.echo(f"no inputs given: using the bundled sample ({images}, {text})")
        options = dataclasses.replace(options, images=images, text=text,
                                      text_options=dataclasses.replace(options.text_options, split_sentences=True))
    run_build(options, ctx.args, wait=wait)


def run_build(options: BuildOptions, beam_args: list[str], wait: bool = True) -> dict:
    """Build and run; the pipeline checks and publishes its own output as its last step. Prints
    the summary. Returns stats.json's content ({} for a dry run or a job not waited for)."""
    from pipelines import build

    try:
        pipeline = build.build_retrieval_pipeline(options, beam_args)
    except (ValueError, FileNotFoundError) as err:
        raise RunError(str(err)) from err
    ran = _run_job(pipeline, options.output, wait,
                   before=lambda: click.echo(f"running build-retrieval on "
                                             f"{pipeline.options.get_all_options()['runner']} ..."),
                   on_failure=lambda: _raise_run_problem(options))
    if ran is None:
        return {}
    result, elapsed = ran
    stats = build.read_stats(options.output)  # published by the pipeline's last step
    _print_summary(stats, result, elapsed, options)
    return stats


def _run_job(pipeline, output: str, wait: bool, before=lambda: None, on_failure=lambda: None):
    """How every command runs its pipeline. A dry run: the runner translates and validates the whole
    job, then stops; nothing is written -> None. Otherwise `before()` (checks, claims, a message once
    the job will run), OUTPUT's staging cleared, then either submitted (not `wait`) -> None, or run to
    the end with progress -> (result, seconds); `on_failure()` may replace a run's error with a clearer
    one. The pipeline publishes its own output as its last step."""
    from pipelines import build
    if is_dry_run(pipeline):
        _run(pipeline)
        click.echo("dry run: the job was built and validated by the runner, not submitted")
        return None
    before()
    build.clear_staging(output)
    if not wait:
        _submit(pipeline, output)
        return None
    start = time.perf_counter()
    try:
        result = _run(pipeline, progress=True)
    except RunError:
        on_failure()
        raise
    return result, time.perf_counter() - start


def _raise_run_problem(options: BuildOptions) -> None:
    """After a failed run: where the publish step refused the run, its one-line reason (from the
    staged stats, which any runner leaves), instead of the runner's wrapped error."""
    from pipelines import build
    try:
        stats = build.read_stats(build.staging_dir(options.output))
    except Exception:  # the run failed before its stats were written: the runner's error says why
        return
    problem = build.run_problem(stats, options)
    if problem:
        raise RunError(problem)


def _submit(pipeline, output: str):
    """Start the job and return at once (a flex template launch must not wait for the job)."""
    try:
        result = pipeline.run()
    except Exception as err:
        raise RunError(f"the pipeline failed: {_root_message(err)}") from err
    job = getattr(result, "job_id", None)
    click.echo(f"submitted{f' job {job()}' if callable(job) else ''}: it publishes into {output} when it succeeds")
    return result


def _run(pipeline, progress: bool = False):
    """Run to completion; with `progress`, per-stage counts, rates and estimates while it runs."""
    try:
        if progress:
            from pipelines.progress import run_with_progress
            # seconds between updates; VLP_PROGRESS_INTERVAL changes it (tests, quieter logs)
            return run_with_progress(pipeline, interval=float(os.environ.get("VLP_PROGRESS_INTERVAL", "5")))
        result = pipeline.run()
        result.wait_until_finish()
    except Exception as err:  # Beam wraps worker errors; show the root cause, not a 200-line trace
        raise RunError(f"the pipeline failed: {_root_message(err)}") from err
    return result


def _print_summary(stats: dict, result, elapsed: float, options: BuildOptions) -> None:
    output = options.output
    click.echo(f"done in {elapsed:.1f}s -> {output}")
    click.echo(f"  images: {stats['images_in']} in, {stats['images_out']} out; sentences: {stats['sentences']}; "
               f"retrievals: {stats['retrievals']} (mean score {stats['mean_retrieval_score']:.3f})")
    text = stats.get("text", {})
    drops = ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in text.items() if k.startswith("dropped_") and v)
    click.echo(f"  text: {text.get('lines', 0)} lines read" + (f", dropped: {drops}" if drops else ""))
    if stats.get("shards"):
        click.echo(f"  shards: {stats['shards']}; phrases per sentence: {stats['phrases_per_sentence']:.2f}; "
                   f"link rate: {stats['link_rate']:.2f}")
    click.echo(f"  rejected: {stats['rejected_total']}" + "".join(f"\n    {k}: {v}" for k, v in stats["rejected"].items()))
    if options.embeddings:
        store = counter_totals(result, "embedding_store")
        click.echo(f"  embedding store {options.embeddings}: {store.get('sentences_reused', 0)} sentences reused, "
                   f"{store.get('sentences_embedded', 0)} embedded and added"
                   + (f", {store['unreadable_files']} unreadable file(s) skipped" if store.get("unreadable_files") else ""))
    cache = corpus_cache_line(result)
    if cache:
        click.echo(cache)
    stage_s = stage_times(result)
    if stage_s:
        click.echo("  time per stage (summed over workers): " + ", ".join(f"{k} {v:.1f}s" for k, v in stage_s.items()))


def corpus_cache_line(result) -> str | None:
    """The summary line of the workers' corpus caches (a remote staging folder's shards copied to
    workers and evicted, pipelines/corpus_cache.py); None where nothing was copied."""
    counts = counter_totals(result, "retrieve")
    if not counts.get("corpus_cache_downloads"):
        return None
    return (f"  corpus cache: {counts['corpus_cache_downloads']} shard copies to workers, "
            f"{counts.get('corpus_cache_evictions', 0)} evicted ({counts.get('corpus_cache_evicted_bytes', 0) / GIB:.2f} "
            f"GiB freed)")


def counter_totals(result, namespace: str) -> dict[str, int]:
    """A namespace's Beam counters summed over steps, by name (empty where the runner reports none)."""
    try:
        from apache_beam.metrics.metric import MetricsFilter
        counters = result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]
    except Exception:  # some runners report no metrics
        return {}
    totals: dict[str, int] = {}
    for c in counters:
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    return totals


def stage_times(result) -> dict[str, float]:
    """Each stage's busy time in seconds (its `stage_us` counter), by stage name."""
    try:
        from apache_beam.metrics.metric import MetricsFilter
        counters = result.metrics().query(MetricsFilter().with_namespace(STAGE_TIME))["counters"]
    except Exception:  # some runners report no metrics
        return {}
    totals: dict[str, float] = {}
    for c in counters:
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0) / 1e6
    return dict(sorted(totals.items()))


def is_dry_run(pipeline) -> bool:
    return _dry_run_option(pipeline.options)


def is_dry_run_args(beam_args: list[str]) -> bool:
    """A dry run (checked from the arguments, before a pipeline is built) writes nothing."""
    from pipelines.build import beam_options
    return _dry_run_option(beam_options(beam_args))


def _dry_run_option(options) -> bool:
    from apache_beam.options.pipeline_options import TestOptions
    return str(options.view_as(TestOptions).dry_run).lower() in ("true", "1")


def _root_message(err: BaseException) -> str:
    """The innermost exception's message (Beam nests worker errors several levels deep)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


@main.command("detect", context_settings=BEAM_PASSTHROUGH)
@click.option("--images", required=True, help="Images or WebDataset tars of images (path or glob).")
@detections_output_options()
@detector_options(grid=True)
@click.pass_context
def detect(ctx, images, output, overwrite, detector, detections_per_file, wait):
    """Run only the detector: images -> detections Parquet (with region features), reusable
    as `build-retrieval --detections` and by `vlp-train finetune --detections`."""
    from pipelines import build
    check_paths_reachable(ctx.args, {"--output": output, "--images": images})
    pipeline = build.build_detect_pipeline(images, output, detector, ctx.args, detections_per_file)
    _run_detections_job(pipeline, output, overwrite, {"--images": images}, wait)


@main.command("convert-detections", context_settings=BEAM_PASSTHROUGH)
@click.option("--detections", required=True,
              help="Detections in any layout build-retrieval reads: JSON Lines, Parquet, VinVL predictions.tsv + "
                   "features.tsv, Oscar/VinVL X.label.tsv / X.feature.tsv / X.hw.tsv or X.yaml (path, glob or comma list).")
@detections_output_options()
@region_cap_option()
@click.pass_context
def convert_detections(ctx, detections, output, overwrite, max_regions, detections_per_file, wait):
    """Re-write detections (e.g. VinVL's TSV files) as `vlp-data detect` writes them: validated,
    regions highest score first, Parquet with region features; bad records dead-lettered. What
    `vlp-train finetune --detections` reads."""
    from pipelines import build
    check_paths_reachable(ctx.args, {"--output": output, "--detections": detections})
    pipeline = build.build_convert_detections_pipeline(detections, output, max_regions, ctx.args, detections_per_file)
    _run_detections_job(pipeline, output, overwrite, {"--detections": detections}, wait)


def _run_detections_job(pipeline, output: str, overwrite: bool, inputs: dict[str, str], wait: bool) -> None:
    """Run (or dry-run, or submit) a job that writes OUTPUT/detections, after checking its inputs
    match files and claiming OUTPUT."""
    def check_and_claim():
        check_inputs(inputs)
        claim_output(output, overwrite)

    ran = _run_job(pipeline, output, wait, before=check_and_claim)
    if ran is not None:
        click.echo(f"done in {ran[1]:.1f}s -> {output}/detections")


@main.command("finish-publish")
@click.argument("output")
def finish_publish(output):
    """Finish the publish of a build that was killed while moving its files into OUTPUT (what
    the next build into OUTPUT would do first), so that readers may read it again."""
    from pipelines import build
    if build.finish_publish(output):
        click.echo(f"finished the interrupted publish into {output}")
    else:
        click.echo(f"{output} has no interrupted publish")


@main.command("report")
@click.argument("output", default="vlp-out", type=click.Path(exists=True, file_okay=False))
@click.option("--images", help="The images the corpus was built from (the --images pattern or folder) "
                               "[default: the shard's own image, or the bundled sample's images].")
@click.option("--samples", default=200, show_default=True, type=click.IntRange(1), help="Samples drawn for the report.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the draw.")
@click.option("--extremes", default=3, show_default=True, type=click.IntRange(0),
              help="Samples of lowest and of highest retrieval score shown side by side.")
@click.option("--out", "out_dir", default="report", show_default=True,
              help="Report folder (replaced when it is an earlier report's or empty).")
@click.option("--overwrite", is_flag=True, help="Replace --out even when it is not an earlier report's folder.")
def report(output, images, samples, seed, extremes, out_dir, overwrite):
    """A static HTML report of a corpus: drawn samples with boxes and linked phrases, counts,
    dead letters, histograms, lowest and highest retrieval scores. Opens from disk."""
    from pipelines.report import write_report
    from schemas.corpus import HalfPublishedError
    try:
        index = write_report(output, out_dir, images=images, samples=samples, seed=seed, extremes=extremes,
                             overwrite=overwrite)
    except (HalfPublishedError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"corpus report: {index}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
